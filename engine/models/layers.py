"""Layers every supported family shares, over a flattened, paged batch.

Parameter names match Hugging Face checkpoints, except that q/k/v and gate/up projections are fused;
`checkpoint_target` maps a checkpoint tensor to its place in a fused weight. Every step's tokens of all
sequences are one [T, hidden] batch; attention is delegated to a backend that owns the KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.model_config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (x * (1.0 + weight.float())).to(dtype)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, its norm): the pre-norm block's residual add and the next norm in one pass."""
    x = x + residual
    return x, rms_norm(x, weight, eps, unit_offset)


class RMSNorm(nn.Module):
    """RMSNorm; `unit_offset` is Gemma's variant, which stores w - 1 and scales in float32 before the cast
    (Llama casts first), so both round exactly as their reference implementations do."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset
        self.norm, self.add_norm = rms_norm, add_rms_norm  # fused by `compile_pointwise`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps, self.unit_offset)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.add_norm(x, residual, self.weight, self.eps, self.unit_offset)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with linear scaling or Llama 3.1's piecewise low/high-frequency rescaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin for the step's positions, computed once per step and shared by the layers of one RoPE base."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """The buffer's value (the loader refills it after building the model on the meta device)."""
        return rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def unreduced(x: torch.Tensor) -> torch.Tensor:
    """One process holds the whole layer: its output is already the sum (see engine/distributed.py)."""
    return x


def gated_activation(gate_up: torch.Tensor, size: int, tanh_gelu: bool) -> torch.Tensor:
    gate, up = gate_up.split(size, dim=-1)
    return (F.gelu(gate, approximate="tanh") if tanh_gelu else F.silu(gate)) * up


class Attention(nn.Module):
    """Fused qkv projection, optional per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE, then the backend.

    A windowed layer hands its window to the backend, which reads only the last `window` positions.
    A non-default softmax scale (Gemma's query_pre_attn_scalar) is folded into q, so every backend keeps
    its 1/sqrt(head_dim).
    """

    def __init__(self, cfg: ModelConfig, layer: int, unit_offset_norm: bool = False):
        super().__init__()
        self.layer = layer
        self.window = cfg.window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one matmul: one weight read, one launch (checkpoints' q/k/v_proj load as shards).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, unit_offset_norm)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, unit_offset_norm)
        q_scale = cfg.attn_scale * math.sqrt(cfg.head_dim) if cfg.attn_scale else 1.0
        self.q_scale = None if q_scale == 1.0 else q_scale
        self.rotate = rotate_qk  # fused by `compile_pointwise`
        self.reduce = unreduced  # tensor parallelism: the all-reduce of the ranks' partial o_proj outputs

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, k, *rope)
        if self.q_scale is not None:
            q = q * self.q_scale
        out = backend.forward(self.layer, q, k, v.view(t, self.num_kv_heads, self.head_dim), meta,
                              window=self.window)
        return self.reduce(self.o_proj(out.reshape(t, self.q_size)))


class GatedMLP(nn.Module):
    """SwiGLU (Llama, Qwen, Mistral) or GeGLU with tanh GELU (Gemma): down(act(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported MLP activation {cfg.hidden_act!r}")
        self.tanh_gelu = cfg.hidden_act == "gelu_pytorch_tanh"
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.activation = gated_activation  # fused by `compile_pointwise`
        self.reduce = unreduced  # tensor parallelism: the all-reduce of the ranks' partial down_proj outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.activation(self.gate_up_proj(x), self.intermediate_size, self.tanh_gelu)
        return self.reduce(self.down_proj(gated))


def compile_pointwise(model: nn.Module) -> None:
    """CUDA: torch.compile the elementwise work between the matmuls (RMSNorm with the residual add before
    it, the gated activation, RoPE), each into one fused kernel, inside the decode graphs too. Shapes are
    dynamic, so one compile serves every batch size and query length; what still varies (a norm over the
    hidden size or over each head, size-1 head counts, eps) gets its own compile, up to a limit past which
    dynamo runs that variant eagerly rather than failing."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fused = {fn: torch.compile(fn, dynamic=True) for fn in (rms_norm, add_rms_norm, gated_activation)}
    # q's and k's rotations are two kernels of different sizes; inductor's combo kernels launch them as one
    fused[rotate_qk] = torch.compile(rotate_qk, dynamic=True, options={"combo_kernels": True})
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.norm, m.add_norm = fused[rms_norm], fused[add_rms_norm]
        elif isinstance(m, Attention):
            m.rotate = fused[rotate_qk]
        elif isinstance(m, GatedMLP):
            m.activation = fused[gated_activation]


# checkpoint projection -> (fused parameter, index of its shard)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def lm_head(cfg: ModelConfig, embedding: nn.Embedding) -> nn.Linear:
    """The output projection; it shares the embedding's weight where the checkpoint ties them."""
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    if cfg.tie_word_embeddings:
        head.weight = embedding.weight
    return head


_COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # output rows split over ranks
_ROW_PARALLEL = {"o_proj", "down_proj"}  # input columns split over ranks


def rank_slice(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The part of a checkpoint tensor this tensor-parallel rank holds (cfg.tp_rank of cfg.tp_size):
    its heads' rows of q/k/v (weights and biases) and its rows of gate/up; the matching input columns
    of o_proj and down_proj; everything else (embedding, norms, LM head) whole."""
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if cfg.tp_size == 1:
        return tensor
    if proj in _COLUMN_PARALLEL:
        return tensor.chunk(cfg.tp_size, dim=0)[cfg.tp_rank]
    if proj in _ROW_PARALLEL and parts[-1] == "weight":
        return tensor.chunk(cfg.tp_size, dim=1)[cfg.tp_rank]
    return tensor


def checkpoint_target(cfg: ModelConfig, name: str) -> tuple[str, slice | None]:
    """Where a Hugging Face tensor goes: (our parameter name, rows within it or None for all)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in _FUSED:
        return name, None
    fused, shard = _FUSED[parts[-2]]
    sizes = ([cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2 if fused == "qkv_proj"
             else [cfg.intermediate_size] * 2)
    start = sum(sizes[:shard])
    return ".".join([*parts[:-2], fused, parts[-1]]), slice(start, start + sizes[shard])
