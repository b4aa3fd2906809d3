"""The elementwise work of a CPU step in C++ (cpu_pointwise.cpp): RMSNorm (with the residual add before
it), RoPE and SwiGLU's SiLU(gate) * up, each one call where torch dispatches five to twelve small ops.

At SmolLM2-135M's size a decode step is mostly that dispatch: 30 layers of a dozen such ops cost more
than the int4 matmuls between them. `native_pointwise` swaps these functions into the model the way
`compile_pointwise` swaps compiled ones in on CUDA. They read and write float32, as the CPU's linears
(fp32 and int4) do. What they do not serve (other dtypes, strided rows, GELU) goes to the torch functions
of engine/models/layers.py, the reference the tests compare against: the values are the same either way.
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


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "the CPU runs RMSNorm, RoPE and SwiGLU as torch ops", ("-ffp-contract=off",))
    if lib is not None:
        p, i, f, b = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        lib.rms_norm.argtypes = [p, i, p, p, i, i, f, b, p, p, b]
        lib.rope.argtypes = [p, i, p, i, i, i, i, i, p, p, p, p, b]
        lib.silu_mul.argtypes = [p, i, i, i, p, b]
        lib.rms_norm.restype = lib.rope.restype = lib.silu_mul.restype = None
    return lib


def _rows(x: torch.Tensor) -> bool:
    """x is [rows, width] float32 on the CPU with each row contiguous."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    if not (_rows(x) and weight.dtype == torch.float32):
        return layers.rms_norm(x, weight, eps, unit_offset)
    out = torch.empty(x.shape)
    rows, dim = x.shape
    _library().rms_norm(x.data_ptr(), x.stride(0), None, weight.data_ptr(), rows, dim, eps, unit_offset, None,
                        out.data_ptr(), torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, its norm)."""
    if not (_rows(x) and _rows(residual) and weight.dtype == torch.float32 and residual.is_contiguous()
            and residual.shape == x.shape):
        return layers.add_rms_norm(x, residual, weight, eps, unit_offset)
    total, out = torch.empty(x.shape), torch.empty(x.shape)
    rows, dim = x.shape
    _library().rms_norm(x.data_ptr(), x.stride(0), residual.data_ptr(), weight.data_ptr(), rows, dim, eps,
                        unit_offset, total.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return total, out


def _heads(x: torch.Tensor) -> bool:
    """x is [rows, heads, head_dim] with its heads contiguous within each row."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2])


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_heads(q) and _heads(k) and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
            and sin.is_contiguous() and cos.numel() == q.shape[0] * q.shape[2]):
        return layers.rotate_qk(q, k, cos, sin)
    rows, hq, d = q.shape
    q_out, k_out = torch.empty(q.shape), torch.empty(k.shape)
    _library().rope(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), rows, hq, k.shape[1], d,
                    cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                    torch.get_num_threads())
    return q_out, k_out


def gated_activation(gate_up: torch.Tensor, size: int, tanh_gelu: bool) -> torch.Tensor:
    if tanh_gelu or not (_rows(gate_up) and gate_up.shape[1] == 2 * size):
        return layers.gated_activation(gate_up, size, tanh_gelu)
    out = torch.empty(gate_up.shape[0], size)
    _library().silu_mul(gate_up.data_ptr(), gate_up.stride(0), gate_up.shape[0], size, out.data_ptr(),
                        torch.get_num_threads())
    return out


def native_pointwise(model: nn.Module) -> bool:
    """Swap the C++ functions into a float32 CPU model; False (nothing changed) for other dtypes or where
    they cannot be built."""
    if next(model.parameters()).dtype != torch.float32 or _library() is None:
        return False
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.norm, m.add_norm = rms_norm, add_rms_norm
        elif isinstance(m, Attention):
            m.rotate = rotate_qk
        elif isinstance(m, GatedMLP):
            m.activation = gated_activation
    return True
