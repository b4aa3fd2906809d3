"""Weight-only quantised linears for the CPU (`--quantization int4`), in the formats the GGUF ships.

A CPU decode step is bound by reading the weights: SmolLM2-135M reads 540 MB of fp32 per token where
llama.cpp reads its ~80 MB of blocks. Here every linear layer keeps its weight as asymmetric int4 in
groups of 32 input channels, GGUF Q4_1's layout (w = scale * q + min), packed for torch's own CPU kernel
(`_weight_int4pack_mm_for_cpu`, bf16 activations and bf16 scales), for steps of a few rows (decode,
verify); a prefill chunk's many rows run faster in fp32, so those layers also keep the Q4_1 blocks
themselves (fp16 scale and minimum), which cpu_qmatmul.cpp dequantises once per call. The LM head,
which the GGUF ties to its 8-bit embedding, is Q8_0 (per 32 inputs an fp16 scale, w = scale * q):
cpu_qmatmul.cpp multiplies it with each activation row quantised to int8 per 32 inputs, as llama.cpp
does, at a quarter of the fp32 head's bytes (without a compiler it dequantises instead, and prefill
takes the int4 kernel). The bundled GGUF is Q4_1 / Q8_0, so requantising its dequantised blocks finds
the same levels again; what changes against fp32 is the rounding of activations and of each group's
scale (tests/test_quantization.py bounds the logprob difference and the top-1 agreement).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from needle.attention import native

GROUP = 32
METHODS = ("none", "int4")
SOURCE = Path(__file__).with_name("cpu_qmatmul.cpp")
# Calls with more rows than this dequantise and multiply in fp32. Per SmolLM2 layer shape on 2 cores,
# torch's int4 kernel against dequantise + fp32 matmul: 8 rows 0.1-0.5x the time, 32 rows ~1x, 64 rows
# 1.3-1.6x, 512 rows 1.7-2.7x (prefill: bench/quantization.py's prefill column).
INT4_KERNEL_ROWS = 32


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "the int8 LM head dequantises to fp32 on every call")
    if lib is not None:
        p, i = ctypes.c_void_p, ctypes.c_int64
        lib.q8_matmul.argtypes = [p, i, i, p, p, i, p, ctypes.c_int]
        lib.q4_dequantize.argtypes = [p, p, p, i, i, p, ctypes.c_int]
        lib.q8_matmul.restype = lib.q4_dequantize.restype = None
    return lib


def _blocks(linear: nn.Linear, group: int) -> torch.Tensor:
    w = linear.weight.detach().float()
    n, k = w.shape
    if k % group:
        raise ValueError(f"block quantisation needs input features divisible by {group}, got {k}")
    return w.view(n, k // group, group)


_scratch = torch.empty(0)  # one fp32 buffer every layer's dequantised weight reuses (one layer at a time)


def _scratch_weight(n: int, k: int) -> torch.Tensor:
    global _scratch
    if _scratch.numel() < n * k:
        _scratch = torch.empty(n * k)
    return _scratch[:n * k].view(n, k)


class Int4Linear(nn.Module):
    input_dtype = torch.bfloat16  # what the int4 kernel multiplies: a producer that writes it saves a cast

    def __init__(self, linear: nn.Linear, group: int = GROUP):
        super().__init__()
        blocks = _blocks(linear, group)
        n = blocks.shape[0]
        low, high = blocks.amin(-1), blocks.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((blocks - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, -1), 1))
        half = group // 2  # the Q4_1 blocks for prefill: byte j holds inputs j and j + 16 of its block
        nibbles = q.to(torch.uint8)
        self.register_buffer("blocks", (nibbles[..., :half] | (nibbles[..., half:] << 4)).flatten(1)
                             .contiguous())
        self.register_buffer("block_scales", scale.half().contiguous())
        self.register_buffer("block_mins", low.half().contiguous())
        # The kernel computes (q - 8) * scale + zero: zero is the group's middle level.
        zeros = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, zeros.T], -1).to(torch.bfloat16)
                             .contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.group, self.out_features = group, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of up to INT4_KERNEL_ROWS come back in bfloat16, as the kernel makes them (engine/
        cpu_pointwise.py reads them without a cast); more rows in float32."""
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        lib = _library() if rows.shape[0] > INT4_KERNEL_ROWS else None
        if lib is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.packed, self.group,
                                                            self.scales_and_zeros)
        else:
            y = rows.float() @ self.dequantized(lib).T
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self, lib: ctypes.CDLL) -> torch.Tensor:
        """The fp32 weight the Q4_1 blocks stand for, in the shared scratch buffer."""
        n, k = self.out_features, self.blocks.shape[1] * 2
        weight = _scratch_weight(n, k)
        lib.q4_dequantize(self.blocks.data_ptr(), self.block_scales.data_ptr(), self.block_mins.data_ptr(),
                          n, k, weight.data_ptr(), torch.get_num_threads())
        return weight


class Int8Linear(nn.Module):
    """Q8_0 without a bias (the LM heads it serves have none): per 32 inputs an fp16 scale, |q| <= 127."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("the int8 linear serves bias-free LM heads")
        blocks = _blocks(linear, GROUP)
        scale = (blocks.abs().amax(-1) / 127).clamp(min=1e-10).half()
        q = torch.round(blocks / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_q", q.flatten(1).contiguous())
        self.register_buffer("scales", scale.contiguous())
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * GROUP

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight the blocks stand for: the fallback's and the tests' reference."""
        q = self.weight_q.view(self.out_features, -1, GROUP).float()
        return (q * self.scales.float()[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float().contiguous()
        lib = _library()
        if lib is None:
            y = rows @ self.dequantized().T
        else:
            y = torch.empty(rows.shape[0], self.out_features)
            lib.q8_matmul(rows.data_ptr(), rows.shape[0], self.in_features, self.weight_q.data_ptr(),
                          self.scales.data_ptr(), self.out_features, y.data_ptr(), torch.get_num_threads())
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def quantize(model: nn.Module, method: str, device: torch.device, head: str = "lm_head") -> nn.Module:
    """Swap every nn.Linear of the model for its int4 version and the LM head (`head`) for int8, in place.
    The head stays at 8 bits, as the GGUF keeps the embedding it is tied to: at 4 bits it flips 8% of
    greedy tokens (bench/quantization.py)."""
    if method == "none":
        return model
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {METHODS}")
    if device.type != "cpu":
        raise ValueError("--quantization int4 runs on the CPU (torch's int4 CPU kernel); on CUDA use none")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, (Int8Linear if name == head else Int4Linear)(child))
    return model
