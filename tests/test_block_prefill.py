"""Block-sparse prefill (attention/kernels/block_prefill.py): the block choice and the torch attention
over the chosen blocks, against float64 references on fresh random inputs, and through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from needle.attention.kernels.block_prefill import (
    BLOCK,
    block_sparse_prefill_torch,
    prefill_block_sparse,
    prefill_blocks,
    skips_blocks,
)
from needle.attention.kernels.reference import prefill_ref


def masked_reference(q, k, v, scale, blocks, block=BLOCK):
    """Each query row: softmax attention over the causal keys of its query block's chosen key blocks."""
    n, hkv, g, d = q.shape
    ctx = k.shape[0]
    first = (ctx - n) // block
    out = torch.empty(n, hkv, g, d, dtype=torch.float64)
    for h in range(hkv):
        for t in range(n):
            p = ctx - n + t
            chosen = blocks[h, p // block - first]
            keys = (chosen[chosen >= 0].long()[:, None] * block + torch.arange(block)).flatten()
            keys = keys[keys <= p]
            s = (q[t, h].double() @ k[keys, h].double().T) * scale
            out[t, h] = torch.softmax(s, -1) @ v[keys, h].double()
    return out


@pytest.mark.parametrize("n,ctx", [(300, 1000), (5, 2000), (700, 3000), (640, 640)])
def test_attention_over_the_chosen_blocks_matches_reference(n, ctx):
    gen = torch.Generator().manual_seed(n + ctx)
    hkv, g, d = 2, 3, 32
    q = torch.randn(n, hkv, g, d, generator=gen)
    k, v = torch.randn(ctx, hkv, d, generator=gen), torch.randn(ctx, hkv, d, generator=gen)
    scale = d ** -0.5
    blocks = prefill_blocks(q, k, scale, 0.3)
    got = block_sparse_prefill_torch(q, k, v, scale, blocks, group_blocks=3)
    assert torch.allclose(got.double(), masked_reference(q, k, v, scale, blocks), atol=1e-5)


def test_density_one_is_dense_causal_attention():
    gen = torch.Generator().manual_seed(1)
    n, ctx, hkv, g, d = 500, 1300, 2, 2, 16
    q = torch.randn(n, hkv, g, d, generator=gen)
    k, v = torch.randn(ctx, hkv, d, generator=gen), torch.randn(ctx, hkv, d, generator=gen)
    blocks = prefill_blocks(q, k, 0.25, 1.0)
    got = block_sparse_prefill_torch(q, k, v, 0.25, blocks)
    want = prefill_ref(q.reshape(n, hkv * g, d), k, v, 0.25, q_offset=ctx - n).view(n, hkv, g, d)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_each_query_block_reads_its_share_and_the_always_read_blocks():
    gen = torch.Generator().manual_seed(2)
    n = ctx = 4096
    q = torch.randn(n, 1, 1, 16, generator=gen)
    k = torch.randn(ctx, 1, 16, generator=gen)
    blocks = prefill_blocks(q, k, 0.25, 0.25)[0]  # [QB, K]
    for qb in range(blocks.shape[0]):
        chosen = blocks[qb][blocks[qb] >= 0].tolist()
        assert chosen == sorted(set(chosen)) and all(c <= qb for c in chosen)
        assert len(chosen) == min(qb + 1, max(math.ceil(0.25 * (qb + 1)), 3))
        assert {0, qb, max(qb - 1, 0)} <= set(chosen)


@pytest.mark.parametrize("n,ctx", [(1000, 3000), (100, 3000)])
def test_a_chunk_attends_block_sparsely_but_its_last_block_of_rows_densely(n, ctx):
    gen = torch.Generator().manual_seed(n)
    hkv, g, d = 2, 2, 16
    q = torch.randn(n, hkv, g, d, generator=gen)
    k, v = torch.randn(ctx, hkv, d, generator=gen), torch.randn(ctx, hkv, d, generator=gen)
    got = prefill_block_sparse(q, k, v, 0.25, 0.25, block_sparse_prefill_torch).double()
    tail = min(n, BLOCK)
    dense = prefill_ref(q[n - tail:].reshape(tail, hkv * g, d), k, v, 0.25, q_offset=ctx - tail)
    assert torch.allclose(got[n - tail:], dense.view(tail, hkv, g, d), atol=1e-5)
    if n > tail:
        head, seen = q[: n - tail], ctx - tail
        blocks = prefill_blocks(head, k[:seen], 0.25, 0.25)
        want = masked_reference(head, k[:seen], v[:seen], 0.25, blocks)
        assert torch.allclose(got[: n - tail], want, atol=1e-5)
        assert not torch.allclose(got[: n - tail], prefill_ref(head.reshape(n - tail, hkv * g, d), k[:seen],
                                  v[:seen], 0.25, q_offset=seen - n + tail).view(-1, hkv, g, d), atol=1e-3)


def test_the_block_the_queries_point_at_is_chosen():
    """A key block aligned with every query outranks random ones: the estimate finds the needle."""
    gen = torch.Generator().manual_seed(3)
    n, ctx, d = 256, 8192, 32
    direction = torch.randn(d, generator=gen)
    q = torch.randn(n, 1, 2, d, generator=gen) + direction
    k = torch.randn(ctx, 1, d, generator=gen)
    needle = 23
    k[needle * BLOCK: (needle + 1) * BLOCK, 0] += direction
    blocks = prefill_blocks(q, k, d ** -0.5, 0.1)
    assert (blocks == needle).any(-1).all()


def test_skips_blocks_only_where_a_block_is_left_out():
    assert not skips_blocks(100_000, 0.0) and not skips_blocks(100_000, 1.0)
    assert not skips_blocks(3 * BLOCK, 0.5)  # every query block reads all three blocks anyway
    assert skips_blocks(8192, 0.25)


def test_engine_prefills_retrieval_heads_block_sparsely(sparse_llm, monkeypatch):
    """Through the real model: a long prompt's prefill runs the block path and decodes (the tokens may
    differ from the dense-retrieval prefill; QUALITY.md measures by how much it matters)."""
    import needle.attention.kernels.block_prefill as block_prefill
    from needle import SamplingParams

    calls = []
    chooser = block_prefill.prefill_blocks

    def counting(*args, **kwargs):
        calls.append(1)
        return chooser(*args, **kwargs)

    monkeypatch.setattr(block_prefill, "prefill_blocks", counting)
    monkeypatch.setattr(sparse_llm.engine.backend, "prefill_density", 0.5)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = sparse_llm.generate([list(range(100, 2600))], greedy)[0]
    assert calls and len(out.outputs[0].token_ids) == 4


def test_density_out_of_range_is_refused():
    from needle.engine.config import EngineArgs

    with pytest.raises(ValueError, match="--sparse-prefill-density"):
        EngineArgs(sparse_prefill_density=1.5)
