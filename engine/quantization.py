"""Weight-only quantised linears for the CPU (`--quantization int4`), in the formats the GGUF ships.

A CPU decode step is bound by reading the weights: SmolLM2-135M reads 540 MB of fp32 per token where
llama.cpp reads its ~80 MB of blocks. Here every linear layer keeps its weight as asymmetric int4 in
groups of 32 input channels, GGUF Q4_1's values (w = scale * q + min, fp16 scale and minimum), laid out in
tiles of 8 output columns for cpu_qmatmul.cpp's q4_matmul, which multiplies them with each activation
row quantised to int8 per 32 inputs, as llama.cpp does: integer multiply-adds, 3-4x faster than torch's
own int4 CPU kernel at 1-16 rows on this machine (AVX2). Steps of a few rows (decode, verify) take that
kernel; a prefill chunk's many rows run faster in fp32, so its layers dequantise the tiles once per call.
The LM head, which the GGUF ties to its 8-bit embedding, is Q8_0 (per 32 inputs an fp16 scale,
w = scale * q), multiplied the same way at a quarter of the fp32 head's bytes. Without a compiler both
dequantise in torch on every call. The bundled GGUF is Q4_1 / Q8_0, so requantising its dequantised
blocks finds the same levels again; what changes against fp32 is the rounding of activations to int8
(tests/test_quantization.py bounds the logprob difference and the top-1 agreement).
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
    lib = native.load(SOURCE, "int4 and int8 linears dequantise to fp32 on every call")
    if lib is not None:
        p, i, t = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.q8_matmul.argtypes = [p, i, i, p, p, i, p, t]
        lib.q4_matmul.argtypes = [p, i, i, p, p, p, i, p, t]
        lib.q4_dequantize.argtypes = [p, p, p, i, i, p, t]
        lib.q8_matmul.restype = lib.q4_matmul.restype = lib.q4_dequantize.restype = None
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


TILE = 8  # output columns per q4_matmul tile


def _tiles(q: torch.Tensor) -> torch.Tensor:
    """[N, K / 32, 32] levels 0..15 -> q4_matmul's [N / 8, K / 32, 128] bytes: register p of a block holds,
    at byte 4 * c + i, input 4 * p + i of column c in its low nibble and input 4 * (p + 4) + i in its high."""
    n, groups, _ = q.shape
    chunks = q.to(torch.uint8).view(n // TILE, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    return (chunks[:, :, :4] | (chunks[:, :, 4:] << 4)).reshape(n // TILE, groups, 128).contiguous()


def _per_tile(values: torch.Tensor) -> torch.Tensor:
    """[N, K / 32] per-block values -> [N / 8, K / 32, 8] fp16, each tile's 8 columns side by side."""
    n, groups = values.shape
    return values.half().view(n // TILE, TILE, groups).transpose(1, 2).contiguous()


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        blocks = _blocks(linear, GROUP)
        n = blocks.shape[0]
        padded = -(-n // TILE) * TILE  # zero columns complete the last tile; forward drops them
        blocks = torch.cat([blocks, blocks.new_zeros(padded - n, *blocks.shape[1:])])
        low, high = blocks.amin(-1), blocks.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((blocks - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.register_buffer("tiles", _tiles(q))
        self.register_buffer("scales", _per_tile(scale))
        self.register_buffer("mins", _per_tile(low))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.out_features, self.in_features, self.padded = n, blocks.shape[1] * GROUP, padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        lib = _library()
        if lib is None:
            y = rows @ self.dequantized_torch().T
        elif rows.shape[0] <= INT4_KERNEL_ROWS:
            y = torch.empty(rows.shape[0], self.padded)
            lib.q4_matmul(rows.data_ptr(), rows.shape[0], self.in_features, self.tiles.data_ptr(),
                          self.scales.data_ptr(), self.mins.data_ptr(), self.padded, y.data_ptr(),
                          torch.get_num_threads())
        else:
            y = rows @ self.dequantized(lib).T
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self, lib: ctypes.CDLL) -> torch.Tensor:
        """The fp32 weight the tiles stand for (padding columns included), in the shared scratch buffer."""
        weight = _scratch_weight(self.padded, self.in_features)
        lib.q4_dequantize(self.tiles.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), self.padded,
                          self.in_features, weight.data_ptr(), torch.get_num_threads())
        return weight

    def dequantized_torch(self) -> torch.Tensor:
        """The same weight unpacked by torch: the fallback's and the tests' reference."""
        tiles, groups = self.tiles.shape[0], self.tiles.shape[1]
        b = self.tiles.view(tiles, groups, 4, TILE, 4)
        levels = torch.cat([b & 0x0F, b >> 4], 2).permute(0, 3, 1, 2, 4).reshape(self.padded, groups, -1)

        def per_block(values: torch.Tensor) -> torch.Tensor:
            return values.float().transpose(1, 2).reshape(self.padded, groups, 1)

        return (levels.float() * per_block(self.scales) + per_block(self.mins)).flatten(1)


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
