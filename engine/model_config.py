"""The few architecture facts the engine needs, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> architecture name shown to users (and in the unsupported-model error).
SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
             "gemma3_text": "Gemma3 (text)"}
_QKV_BIAS = {"qwen2"}  # families whose q/k/v projections always carry a bias
_QK_NORM = {"qwen3", "gemma3_text"}  # families with an RMSNorm over each head's q and k
_GEMMA_LOCAL_THETA = 10_000.0  # Gemma 3's default RoPE base on its sliding-window layers


class UnsupportedModelError(ValueError):
    """A model we cannot load; the message names what is supported."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False
    metadata_name: str | None = None  # the name the checkpoint gives itself (a GGUF's general.name)
    # Per layer: the sliding window in tokens (the layer reads positions > pos - window), None = global.
    layer_windows: tuple[int | None, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of the windowed layers, when it differs (Gemma 3)
    attn_scale: float | None = None  # softmax scale when not 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar)
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"
    # Tensor parallelism: this process holds shard tp_rank of tp_size (the head and MLP counts are its own).
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def architecture(self) -> str:
        return SUPPORTED[self.model_type]

    @property
    def windowed(self) -> bool:
        """True when some layer attends only to a sliding window."""
        return any(w is not None for w in self.layer_windows)

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @classmethod
    def from_dict(cls, cfg: dict, name: str) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type == "gemma3" and "text_config" in cfg:  # the multimodal wrapper: serve its text model
            cfg = {**cfg["text_config"], "model_type": "gemma3_text",
                   "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
            model_type = "gemma3_text"
        if model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type or cfg.get('architectures')!r}; needle supports the "
                f"Llama family (Llama 2/3/3.1, SmolLM, Mistral, Qwen2/2.5, Qwen3) and Gemma 3 text "
                f"(config model_type: {', '.join(SUPPORTED)})")
        if cfg.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError("attention logit softcapping (Gemma 2) is not supported")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError("bidirectional attention (EmbeddingGemma) is not supported")
        gemma = model_type == "gemma3_text"
        rope = cfg.get("rope_parameters") or {}
        global_rope = rope.get("full_attention", rope) if gemma else rope
        local_rope = rope.get("sliding_attention", {}) if gemma else {}
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and global_rope.get("rope_type", "default") != "default":
            rope_scaling = global_rope
        eos = cfg.get("eos_token_id", [])
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        num_layers = cfg["num_hidden_layers"]
        scalar = cfg.get("query_pre_attn_scalar") if gemma else None
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or global_rope.get("rope_theta", 1e6 if gemma else 10000.0),
            rope_scaling=rope_scaling,
            max_model_len=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            qkv_bias=model_type in _QKV_BIAS or bool(cfg.get("attention_bias", False)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            metadata_name=cfg.get("_model_name_or_path"),
            qk_norm=model_type in _QK_NORM,
            layer_windows=layer_windows(cfg, model_type, num_layers),
            local_rope_theta=(cfg.get("rope_local_base_freq") or local_rope.get("rope_theta")
                              or _GEMMA_LOCAL_THETA) if gemma else None,
            attn_scale=scalar ** -0.5 if scalar else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
        )

    def shard(self, rank: int, size: int) -> ModelConfig:
        """The slice of the model tensor-parallel rank `rank` of `size` holds: 1/size of the attention
        heads, KV heads and MLP width (Megatron's column/row split); one clear error when they do not
        divide."""
        if size == 1:
            return self
        counts = {"attention heads": self.num_heads, "KV heads": self.num_kv_heads,
                  "MLP intermediate size": self.intermediate_size}
        uneven = [f"{n} {what}" for what, n in counts.items() if n % size]
        if uneven:
            raise UnsupportedModelError(f"--tensor-parallel-size {size} must divide the model's "
                                        f"{', '.join(uneven)} (each rank holds whole heads)")
        return dataclasses.replace(self, num_heads=self.num_heads // size,
                                   num_kv_heads=self.num_kv_heads // size,
                                   intermediate_size=self.intermediate_size // size,
                                   tp_rank=rank, tp_size=size)

    @property
    def identity(self) -> dict:
        """What makes a head profile fit this model, whatever its file is called: architecture, shape and
        the checkpoint's own name where it has one."""
        return {"architecture": self.model_type, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
                "name": self.metadata_name}

    @classmethod
    def from_file(cls, path: Path, name: str) -> ModelConfig:
        return cls.from_dict(json.loads(path.read_text()), name)


def layer_windows(cfg: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None = global), as transformers decides it per family:
    `layer_types` when the config lists them; else Mistral windows every layer when `sliding_window` is
    set, Qwen2/3 window layers >= `max_window_layers` only with `use_sliding_window`, and Gemma 3 makes
    every `sliding_window_pattern`-th layer global (default 6); Llama has no window."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if not window or model_type == "llama":
        return (None,) * num_layers
    types = None if model_type == "mistral" else cfg.get("layer_types")  # Mistral windows every layer
    if types is None:
        if model_type == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(num_layers)]
        elif model_type in ("qwen2", "qwen3"):
            first = cfg.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention"] * num_layers
    return tuple(window if t == "sliding_attention" else None for t in types)
