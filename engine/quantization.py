"""Weight-only int4 linears for the CPU (`--quantization int4`): the layers read ~1/7 of the fp32 bytes.

A CPU decode step is bound by reading the weights: SmolLM2-135M reads 540 MB of fp32 per token where
llama.cpp reads its ~80 MB of 4-bit blocks. Here every linear layer (and the LM head) keeps its weight as
asymmetric int4 in groups of 32 input channels, GGUF Q4_1's layout (w = scale * q + min), packed for
torch's own CPU kernel (`_weight_int4pack_mm_for_cpu`), which takes bf16 activations and bf16
scales; activations elsewhere stay in the model's dtype. The bundled GGUF is Q4_1, so min/max
requantisation of its dequantised blocks finds the same levels again; what changes against fp32 is the
bf16 rounding of activations and of each group's scale and minimum (tests/test_quantization.py bounds
the logprob difference and the top-1 agreement).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32
METHODS = ("none", "int4")


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group: int = GROUP):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % group:
            raise ValueError(f"int4 needs input features divisible by {group}, got {k}")
        blocks = w.view(n, k // group, group)
        low, high = blocks.amin(-1), blocks.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((blocks - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k), 1))
        # The kernel computes (q - 8) * scale + zero: zero is the group's middle level.
        zeros = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, zeros.T], -1).to(torch.bfloat16)
                             .contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.group, self.out_features = group, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16),
                                                        self.packed, self.group, self.scales_and_zeros)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize(model: nn.Module, method: str, device: torch.device,
             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Swap every nn.Linear of the model but those named in `skip` for its int4 version, in place. The LM
    head stays: it is tied to the embedding, which the GGUF keeps at 8 bits, and at 4 bits it flips 8%
    of greedy tokens (1.3% without it; bench/quantization.py)."""
    if method == "none":
        return model
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {METHODS}")
    if device.type != "cpu":
        raise ValueError("--quantization int4 runs on the CPU (torch's int4 CPU kernel); on CUDA use none")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(parent, name, Int4Linear(child))
    return model
