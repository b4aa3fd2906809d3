"""A Llama-family decoder layer's int4 decode step in two C++ calls around the attention backend
(cpu_layer.cpp): norm + qkv projection + RoPE before it, o projection + residual norm + SwiGLU MLP +
residual after it. The matmuls are cpu_qmatmul.cpp's int4 kernel, the elementwise work
cpu_pointwise.cpp's, so the values are the module path's bit for bit (tests/test_quantization.py);
what goes is the Python between them: at SmolLM2-135M's size ~200 us a layer, more than its matmuls.

`fuse_decoder_layers` gives each eligible layer a `FusedDecode`, which it runs for steps of up to
INT4_KERNEL_ROWS rows (decode, verify); prefill chunks keep the modules (fp32 matmuls). Eligible:
every projection int4 without bias and padding columns, no q/k norm or query scale, one process (no
tensor-parallel reduce). Where the library cannot be built the modules run every step.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from needle.attention import native
from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.models.layers import unreduced
from needle.engine.quantization import INT4_KERNEL_ROWS, Int4Linear

SOURCE = Path(__file__).with_name("cpu_layer.cpp")


class Int4Weight(ctypes.Structure):
    """cpu_layer.cpp's `Int4`: an Int4Linear's tiles, scales and mins."""

    _fields_ = [("tiles", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p)]

    @classmethod
    def of(cls, linear: Int4Linear) -> Int4Weight:
        return cls(linear.tiles.data_ptr(), linear.scales.data_ptr(), linear.mins.data_ptr())


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "int4 decode runs each layer module by module", ("-ffp-contract=off",))
    if lib is not None:
        p, i, f, b, w = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, Int4Weight
        lib.attention_input.argtypes = [p, i, i, p, f, w, i, i, i, p, p, p, p, p, b]
        lib.attention_output.argtypes = [p, p, i, i, i, w, p, f, w, i, w, p, b]
        lib.attention_input.restype = lib.attention_output.restype = None
    return lib


class FusedDecode:
    """One layer's decode step: attention_input, the backend, attention_output. The weights' addresses
    are taken once (the model's buffers never move)."""

    def __init__(self, layer: nn.Module, lib: ctypes.CDLL):
        attn, mlp = layer.self_attn, layer.mlp
        self.lib, self.layer, self.window = lib, attn.layer, attn.window
        self.hidden = attn.o_proj.out_features
        self.q_shape, self.kv_shape = (attn.num_heads, attn.head_dim), (attn.num_kv_heads, attn.head_dim)
        first, second = layer.input_layernorm, layer.post_attention_layernorm
        self.input_args = (first.weight.data_ptr(), first.eps, Int4Weight.of(attn.qkv_proj), attn.num_heads,
                           attn.num_kv_heads, attn.head_dim)
        self.output_args = (attn.num_heads * attn.head_dim, Int4Weight.of(attn.o_proj),
                            second.weight.data_ptr(), second.eps, Int4Weight.of(mlp.gate_up_proj),
                            mlp.intermediate_size, Int4Weight.of(mlp.down_proj))

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                 meta: AttentionMetadata) -> torch.Tensor:
        rows, threads = x.shape[0], torch.get_num_threads()
        q = torch.empty(rows, *self.q_shape)
        k, v = torch.empty(rows, *self.kv_shape), torch.empty(rows, *self.kv_shape)
        cos, sin = rope
        self.lib.attention_input(x.data_ptr(), rows, self.hidden, *self.input_args, cos.data_ptr(),
                                 sin.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), threads)
        attn = backend.forward(self.layer, q, k, v, meta, window=self.window).contiguous()
        out = torch.empty(x.shape)
        self.lib.attention_output(x.data_ptr(), attn.data_ptr(), rows, self.hidden, *self.output_args,
                                  out.data_ptr(), threads)
        return out

    @staticmethod
    def serves(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """A decode-sized float32 step with contiguous rows and RoPE tables."""
        return (x.shape[0] <= INT4_KERNEL_ROWS and x.dtype == torch.float32 and x.is_contiguous()
                and rope[0].dtype == torch.float32 and rope[0].is_contiguous() and rope[1].is_contiguous())


def _eligible(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not hasattr(layer, "post_attention_layernorm"):
        return False
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    unpadded = all(isinstance(p, Int4Linear) and p.bias is None and p.padded == p.out_features
                   for p in projections)
    return (unpadded and not attn.qk_norm and attn.q_scale is None and not mlp.tanh_gelu
            and attn.reduce is mlp.reduce is unreduced and not layer.input_layernorm.unit_offset)


def fuse_decoder_layers(model: nn.Module) -> int:
    """Give every eligible layer (those with a `fused` slot) its FusedDecode; -> how many got one."""
    layers = [m for m in model.modules() if hasattr(m, "fused") and _eligible(m)]
    lib = _library() if layers else None
    if lib is None:
        return 0
    for layer in layers:
        layer.fused = FusedDecode(layer, lib)
    return len(layers)
