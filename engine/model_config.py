"""The few architecture facts the engine needs, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# model_type -> (architecture name shown to users, q/k/v projections carry a bias)
SUPPORTED = {"llama": ("Llama", False), "mistral": ("Mistral", False), "qwen2": ("Qwen2", True)}


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
    metadata_name: str | None = None  # the name the checkpoint gives itself (a GGUF's general.name)

    @classmethod
    def from_dict(cls, cfg: dict, name: str) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED:
            names = ", ".join(arch for arch, _ in SUPPORTED.values())
            raise UnsupportedModelError(
                f"unsupported architecture {model_type or cfg.get('architectures')!r}; "
                f"needle supports the Llama family: {names} (incl. SmolLM, Llama 2/3/3.1)")
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        eos = cfg.get("eos_token_id", [])
        num_heads = cfg["num_attention_heads"]
        return cls(
            name=name,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            max_model_len=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=SUPPORTED[model_type][1] or cfg.get("attention_bias", False),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            metadata_name=cfg.get("_model_name_or_path"),
        )

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
