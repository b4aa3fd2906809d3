"""The elementwise work of a CPU step in C++ (cpu_pointwise.cpp): RMSNorm (with the residual add before
it), RoPE and SwiGLU's SiLU(gate) * up, each one call where torch dispatches five to twelve small ops.

At SmolLM2-135M's size a decode step is mostly that dispatch: 30 layers of a dozen such ops cost more
than the int4 matmuls between them. `native_pointwise` swaps these functions into the model the way
`compile_pointwise` swaps compiled ones in on CUDA. They read float32 or bfloat16 (the int4 kernel's
output, engine/quantization.py) and compute in float32, so no cast runs between a matmul and them: a
norm writes float32 unless it feeds a linear that takes bfloat16 (its `out_dtype`), SiLU * up writes
its input's dtype (it feeds the down projection), RoPE float32. What they do not serve (other dtypes,
strided rows, GELU) goes to the torch functions of engine/models/layers.py, the reference the tests
compare against, on float32 inputs: the values are the same either way.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from needle.attention import native
from needle.engine.models import layers
from needle.engine.models.layers import Attention, GatedMLP, RMSNorm

SOURCE = Path(__file__).with_name("cpu_pointwise.cpp")
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "the CPU runs RMSNorm, RoPE and SwiGLU as torch ops", ("-ffp-contract=off",))
    if lib is not None:
        p, i, f, b = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        lib.rms_norm.argtypes = [p, i, b, p, b, p, i, i, f, b, p, p, b, b]
        lib.rope.argtypes = [p, i, p, i, b, i, i, i, i, p, p, p, p, b]
        lib.silu_mul.argtypes = [p, i, b, i, i, p, b, b]
        lib.rms_norm.restype = lib.rope.restype = lib.silu_mul.restype = None
    return lib


def _rows(x: torch.Tensor) -> bool:
    """x is [rows, width] float32/bf16 on the CPU with each row contiguous."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2 and x.stride(1) == 1


def _bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if not (_rows(x) and weight.dtype == torch.float32):
        return layers.rms_norm(x.float(), weight, eps, unit_offset).to(out_dtype)
    out = torch.empty(x.shape, dtype=out_dtype)
    rows, dim = x.shape
    _library().rms_norm(x.data_ptr(), x.stride(0), _bf16(x), None, 0, weight.data_ptr(), rows, dim, eps,
                        unit_offset, None, out.data_ptr(), _bf16(out), torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
                 out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual in float32, its norm): either may be the bf16 output of an int4 projection."""
    if not (_rows(x) and _rows(residual) and weight.dtype == torch.float32 and residual.is_contiguous()
            and residual.shape == x.shape):
        total, out = layers.add_rms_norm(x.float(), residual.float(), weight, eps, unit_offset)
        return total, out.to(out_dtype)
    total, out = torch.empty(x.shape), torch.empty(x.shape, dtype=out_dtype)
    rows, dim = x.shape
    _library().rms_norm(x.data_ptr(), x.stride(0), _bf16(x), residual.data_ptr(), _bf16(residual),
                        weight.data_ptr(), rows, dim, eps, unit_offset, total.data_ptr(), out.data_ptr(),
                        _bf16(out), torch.get_num_threads())
    return total, out


def _heads(x: torch.Tensor) -> bool:
    """x is [rows, heads, head_dim] with its heads contiguous within each row."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2])


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_heads(q) and _heads(k) and q.dtype == k.dtype and cos.dtype == sin.dtype == torch.float32
            and cos.is_contiguous() and sin.is_contiguous() and cos.numel() == q.shape[0] * q.shape[2]):
        return layers.rotate_qk(q.float(), k.float(), cos, sin)
    rows, hq, d = q.shape
    q_out, k_out = torch.empty(q.shape), torch.empty(k.shape)
    _library().rope(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), _bf16(q), rows, hq, k.shape[1], d,
                    cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                    torch.get_num_threads())
    return q_out, k_out


def gated_activation(gate_up: torch.Tensor, size: int, tanh_gelu: bool) -> torch.Tensor:
    if tanh_gelu or not (_rows(gate_up) and gate_up.shape[1] == 2 * size):
        return layers.gated_activation(gate_up.float(), size, tanh_gelu).to(gate_up.dtype)
    out = torch.empty(gate_up.shape[0], size, dtype=gate_up.dtype)
    _library().silu_mul(gate_up.data_ptr(), gate_up.stride(0), _bf16(gate_up), gate_up.shape[0], size,
                        out.data_ptr(), _bf16(out), torch.get_num_threads())
    return out


def native_pointwise(model: nn.Module) -> bool:
    """Swap the C++ functions into a float32 CPU model; False (nothing changed) for other dtypes or where
    they cannot be built. A decoder layer's `norm_feeds` names the norms whose output only a linear
    reads: those write the dtype that linear takes (`input_dtype`, bfloat16 for int4), not float32."""
    if next(model.parameters()).dtype != torch.float32 or _library() is None:
        return False
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.norm, m.add_norm = rms_norm, add_rms_norm
        elif isinstance(m, Attention):
            m.rotate = rotate_qk
        elif isinstance(m, GatedMLP):
            m.activation = gated_activation
    for m in model.modules():
        for norm_name, linear_name in getattr(m, "norm_feeds", ()):
            dtype = getattr(m.get_submodule(linear_name), "input_dtype", torch.float32)
            norm = m.get_submodule(norm_name)
            norm.norm = functools.partial(rms_norm, out_dtype=dtype)
            norm.add_norm = functools.partial(add_rms_norm, out_dtype=dtype)
    return True
