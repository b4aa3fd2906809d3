"""The C++ elementwise functions of a CPU step (engine/cpu_pointwise.py) against the torch functions of
engine/models/layers.py on fresh random float32 inputs: one row, a few and a prefill's many (the
threaded path), strided rows as the fused projections leave them."""

from __future__ import annotations

import pytest
import torch

from needle.engine import cpu_pointwise as native
from needle.engine.models import layers

pytestmark = pytest.mark.skipif(native._library() is None, reason="no C++ compiler / AVX2 here")


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_matches_torch(rows: int, unit_offset: bool):
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen)
    w = torch.randn(576, generator=gen)
    wide = torch.randn(rows, 700, generator=gen)[:, 50:626]  # rows 700 apart
    torch.testing.assert_close(native.rms_norm(wide, w, 1e-5, unit_offset),
                               layers.rms_norm(wide.contiguous(), w, 1e-5, unit_offset))
    total, normed = native.add_rms_norm(x, residual, w, 1e-5, unit_offset)
    ref_total, ref = layers.add_rms_norm(x, residual, w, 1e-5, unit_offset)
    assert torch.equal(total, ref_total)  # the residual stream's add is exact
    torch.testing.assert_close(normed, ref)


@pytest.mark.parametrize("rows", [1, 7, 200])
def test_rope_is_torch_bit_for_bit(rows: int):
    """Same products and sums in the same order, no fused multiply-add: identical bits."""
    qkv = torch.randn(rows, 960)
    q, k, _ = qkv.split([576, 192, 192], dim=-1)
    q, k = q.view(rows, 9, 64), k.view(rows, 3, 64)
    cos, sin = layers.Rotary(64, 10000.0)(torch.randint(0, 8192, (rows,)), torch.float32)
    for got, want in zip(native.rotate_qk(q, k, cos, sin), layers.rotate_qk(q, k, cos, sin), strict=True):
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 3, 100])
def test_silu_mul_matches_torch(rows: int):
    gate_up = torch.randn(rows, 2 * 1539) * 6  # a width that is not a multiple of 8
    torch.testing.assert_close(native.gated_activation(gate_up, 1539, False),
                               layers.gated_activation(gate_up, 1539, False))

