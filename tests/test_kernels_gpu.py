"""Triton kernels against their torch references on fresh random inputs.

Marked `gpu`: they run on CUDA and are skipped elsewhere; with TRITON_INTERPRET=1 and Triton installed
they also run on the CPU through Triton's interpreter (slow, for debugging without a GPU).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from needle.attention.kernels import HAS_TRITON
from needle.attention.kernels import reference as ref

pytestmark = pytest.mark.gpu

if torch.cuda.is_available() and HAS_TRITON:
    DEVICE = "cuda"
elif HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")


def rel_err(out, want):
    out, want = out.double(), want.double()
    assert torch.isfinite(out).all()
    return ((out - want).norm() / want.norm().clamp_min(1e-12)).item()


def random_tables(lens, page_size, num_pages, gen):
    """Each sequence gets distinct random pages (page 0 stays unused, as a padding target)."""
    need = [math.ceil(n / page_size) for n in lens]
    perm = torch.randperm(num_pages - 1, generator=gen)[: sum(need)] + 1
    width = max(max(need), 1) + 2  # padded wider than needed
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i:i + n]
        i += n
    return bt


def slots_for(bt, starts, ends, page_size):
    out = []
    for b, (s, e) in enumerate(zip(starts, ends, strict=True)):
        pos = torch.arange(s, e)
        out.append(bt[b].long()[pos // page_size] * page_size + pos % page_size)
    return torch.cat(out)


def make_cache(num_pages, page_size, hkv, d, dtype, gen, sb=16):
    k = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
    kmin, kmax, kmean = (torch.randn(num_pages, page_size // sb, hkv, d, generator=gen).to(dtype).to(DEVICE)
                         for _ in range(3))  # stale junk
    return k.to(DEVICE), v.to(DEVICE), (kmin, kmax, kmean)


@needs_kernels
@pytest.mark.parametrize("page_size,hkv,d,dtype", [(16, 8, 128, torch.bfloat16), (64, 3, 64, torch.float16),
                                                   (32, 1, 128, torch.bfloat16)])
def test_kv_append_matches_reference(page_size, hkv, d, dtype):
    from needle.attention.kernels.kv_append import kv_append

    gen = torch.Generator().manual_seed(1)
    lens = [1, 17, 70, 33]
    bt = random_tables([n + 40 for n in lens], page_size, 64, gen)
    cache = make_cache(64, page_size, hkv, d, dtype, gen)
    mine = (cache[0].clone(), cache[1].clone(), tuple(t.clone() for t in cache[2]))
    steps = [([0] * 4, lens), (lens, [n + 1 for n in lens]), ([n + 1 for n in lens], [n + 9 for n in lens])]
    for starts, ends in steps:  # prefill chunk, one decode token, an 8-token chunk crossing pages
        slots = slots_for(bt, starts, ends, page_size).to(DEVICE)
        slots = torch.cat([slots, torch.full((2,), -1, device=DEVICE)])  # padded rows are skipped
        t = slots.numel()
        qkv = torch.randn(t, 3, hkv, d, generator=gen).to(dtype).to(DEVICE)
        k, v = qkv[:, 1], qkv[:, 2]  # views into a projection's output, as the models pass them
        ref.kv_append_ref(*cache, k, v, slots, 16)
        kv_append(*mine, k, v, slots, 16)
        for got, want in zip([*mine[:2], *mine[2][:2]], [*cache[:2], *cache[2][:2]], strict=True):
            assert torch.equal(got, want)
        # the mean folds the stored (rounded) mean back in: equal up to the cache dtype's rounding
        torch.testing.assert_close(mine[2][2].float(), cache[2][2].float(), rtol=2e-2, atol=2e-2)


def _decode_case(gen, hq, hkv, d, dtype, lens, page_size=16):
    bt = random_tables(lens, page_size, 256, gen).to(DEVICE)
    k, v, (kmin, kmax, _) = make_cache(256, page_size, hkv, d, dtype, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k, v, kmin, kmax, bt, ctx


@needs_kernels
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])  # GQA ratios 1, 4, 8
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16)])
@pytest.mark.parametrize("splits", [None, 3])
def test_paged_decode_matches_reference(hq, hkv, d, dtype, splits):
    from needle.attention.kernels.paged_decode import paged_decode

    gen = torch.Generator().manual_seed(hq * d + (splits or 0))
    lens = [1, 45, 300, 0, 129]  # partial last pages, an empty (padded) row
    q, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    scale = d ** -0.5
    out = paged_decode(q, k, v, bt, ctx, scale, num_splits=splits)
    want = ref.paged_decode_ref(q, k, v, bt, ctx, scale)
    assert rel_err(out, want) < 1e-2
    assert torch.all(out[3] == 0)


@needs_kernels
@pytest.mark.parametrize("hq,hkv,shared", [(8, 2, False), (8, 2, True), (8, 8, False), (16, 2, False)])
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_sparse_decode_matches_reference(hq, hkv, shared, d, dtype):
    from needle.attention.kernels.paged_decode import sparse_decode

    gen = torch.Generator().manual_seed(7 * hq + d)
    ut = 32
    lens = [700, 90, 1000, 5]
    q, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    rows = hkv if shared else hq
    nu = bt.shape[1] * 16 // ut
    units = torch.full((len(lens), rows, 6), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for r in range(rows):
            pick = torch.randperm(math.ceil(n / ut), generator=gen)[:5]
            units[b, r, : pick.numel()] = pick.int()
    units = units.to(DEVICE)
    streaming = (torch.arange(hkv) % 2 == 1).int().to(DEVICE)
    for recent, recent_units in ((40, 0), (0, 2)):  # token window; whole newest units (as sparse.py)
        kw = dict(unit_tokens=ut, sink=16, recent=recent, recent_units=recent_units, stream_sink=8,
                  stream_local=50)
        out = sparse_decode(q, k, v, bt, ctx, units, streaming, scale=d ** -0.5, **kw)
        want = ref.paged_decode_ref(q, k, v, bt, ctx, d ** -0.5, streaming_kv=streaming.bool(), units=units,
                                    **kw)
        assert nu > 0 and rel_err(out, want) < 1e-2


@needs_kernels
@pytest.mark.parametrize("page_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_kernels_read_and_write_fp8_pages(page_dtype):
    """fp8 pages: kv_append stores what to_page_dtype gives and summarises the stored keys in the
    summaries' dtype; the decode kernels equal their reference over the same pages upcast."""
    from needle.attention.kernels.kv_append import kv_append
    from needle.attention.kernels.paged_decode import paged_decode, sparse_decode
    from needle.kvcache.pool import to_page_dtype
    from needle.kvcache.summaries import summarise_pages

    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, dtype = 8, 2, 128, torch.bfloat16
    lens = [700, 90, 1000, 5]
    q, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    k8, v8 = to_page_dtype(k, page_dtype), to_page_dtype(v, page_dtype)
    scale = d ** -0.5
    out = paged_decode(q, k8, v8, bt, ctx, scale)
    assert rel_err(out, ref.paged_decode_ref(q, k8.to(dtype), v8.to(dtype), bt, ctx, scale)) < 1e-2
    units = torch.full((len(lens), hq, 4), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        pick = torch.randperm(math.ceil(n / 32), generator=gen)[:4]
        units[b, :, : pick.numel()] = pick.int()
    units, streaming = units.to(DEVICE), torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    kw = dict(unit_tokens=32, sink=16, recent=40, recent_units=0, stream_sink=8, stream_local=50)
    out = sparse_decode(q, k8, v8, bt, ctx, units, streaming, scale=scale, **kw)
    want = ref.paged_decode_ref(q, k8.to(dtype), v8.to(dtype), bt, ctx, scale,
                                streaming_kv=streaming.bool(), units=units, **kw)
    assert rel_err(out, want) < 1e-2

    slots = slots_for(bt.cpu(), [0] * 4, lens, 16).to(DEVICE)
    new_k = 30 * torch.randn(slots.numel(), hkv, d, generator=gen).to(dtype).to(DEVICE)  # some past 448
    new_v = torch.randn(slots.numel(), hkv, d, generator=gen).to(dtype).to(DEVICE)
    sums = tuple(torch.zeros(256, 1, hkv, d, dtype=dtype, device=DEVICE) for _ in range(3))
    kv_append(k8, v8, sums, new_k, new_v, slots, 16)
    assert torch.equal(k8.view(-1, hkv, d)[slots].to(dtype), to_page_dtype(new_k, page_dtype).to(dtype))
    assert torch.equal(v8.view(-1, hkv, d)[slots].to(dtype), to_page_dtype(new_v, page_dtype).to(dtype))
    want = tuple(torch.zeros_like(t) for t in sums)
    summarise_pages(k8, want, slots, 16)
    for got, expect in zip(sums[:2], want[:2], strict=True):
        assert torch.equal(got, expect)
    torch.testing.assert_close(sums[2].float(), want[2].float(), rtol=2e-2, atol=2e-2)


@needs_kernels
def test_kernels_read_and_write_values_through_value_tables():
    """Offload keeps values at other slots than their keys: kv_append writes them at value slots and
    both decode kernels read them through value tables, giving what the pages' own slots give."""
    from needle.attention.kernels.kv_append import kv_append
    from needle.attention.kernels.paged_decode import paged_decode, sparse_decode

    gen = torch.Generator().manual_seed(11)
    hq, hkv, d, dtype = 8, 2, 64, torch.float16
    lens = [700, 90, 1000, 5]
    q, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    moved = torch.randperm(v.shape[0], generator=gen).to(DEVICE)  # value page of key page p: moved[p]
    v_moved = torch.empty_like(v)
    v_moved[moved] = v
    vt = moved[bt.long()].to(torch.int32)
    scale = d ** -0.5
    assert torch.equal(paged_decode(q, k, v_moved, bt, ctx, scale, value_tables=vt),
                       paged_decode(q, k, v, bt, ctx, scale))
    units = torch.full((len(lens), hkv, 4), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        pick = torch.randperm(math.ceil(n / 32), generator=gen)[:4]
        units[b, :, : pick.numel()] = pick.int()
    kw = dict(unit_tokens=32, sink=16, recent=40, recent_units=0, stream_sink=8, stream_local=50, scale=scale)
    streaming = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    units = units.to(DEVICE)
    assert torch.equal(sparse_decode(q, k, v_moved, bt, ctx, units, streaming, value_tables=vt, **kw),
                       sparse_decode(q, k, v, bt, ctx, units, streaming, **kw))

    slots = slots_for(bt.cpu(), [0] * 4, lens, 16).to(DEVICE)
    value_slots = moved[slots // 16] * 16 + slots % 16
    new_k = torch.randn(slots.numel(), hkv, d, generator=gen).to(dtype).to(DEVICE)
    new_v = torch.randn(slots.numel(), hkv, d, generator=gen).to(dtype).to(DEVICE)
    kv_append(k, v_moved, None, new_k, new_v, slots, 16, value_slots)
    assert torch.equal(k.view(-1, hkv, d)[slots], new_k)
    assert torch.equal(v_moved.view(-1, hkv, d)[value_slots], new_v)


def _verify_case(gen, lens, qlens):
    """query_start_loc of sequences bringing qlens[i] queries each (qlens 0: a padded row)."""
    starts = torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int64, device=DEVICE)
    return starts, sum(qlens), max(qlens)


@needs_kernels
@pytest.mark.parametrize("hq,hkv", [(8, 2), (32, 8), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_verifies_several_queries_as_decodes_at_their_positions(hq, hkv, dtype):
    from needle.attention.kernels.paged_decode import paged_decode

    gen = torch.Generator().manual_seed(hq + 3 * hkv)
    lens, qlens = [300, 45, 0, 129, 1000], [5, 1, 2, 8, 3]  # a plain decode and a padded row among them
    _, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, 128, dtype, lens)
    starts, t, nq = _verify_case(gen, lens, qlens)
    q = torch.randn(t, hq, 128, generator=gen).to(dtype).to(DEVICE)
    out = paged_decode(q, k, v, bt, ctx, 128 ** -0.5, query_start_loc=starts, max_query_len=nq)
    rctx, rbt, _ = ref.verify_as_decodes(starts, ctx, bt)
    want = ref.paged_decode_ref(q, k, v, rbt, rctx, 128 ** -0.5)
    assert rel_err(out, want) < 1e-2


@needs_kernels
@pytest.mark.parametrize("window", [24, 100, 4096])
@pytest.mark.parametrize("verify", [False, True])
def test_paged_decode_reads_only_a_sliding_window(window, verify):
    """Each query reads its last `window` keys: a streaming head with no sinks in the reference."""
    from needle.attention.kernels.paged_decode import paged_decode

    gen = torch.Generator().manual_seed(window + verify)
    hq, hkv, d, dtype = 8, 2, 64, torch.float16
    lens, qlens = [300, 45, 1000, 7], [3, 1, 4, 2]
    _, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    starts, t, nq = _verify_case(gen, lens, qlens if verify else [1] * len(lens))
    q = torch.randn(t, hq, d, generator=gen).to(dtype).to(DEVICE)
    kw = dict(query_start_loc=starts, max_query_len=nq) if verify else {}
    out = paged_decode(q, k, v, bt, ctx, d ** -0.5, window=window, **kw)
    rctx, rbt, _ = ref.verify_as_decodes(starts, ctx, bt)
    want = ref.paged_decode_ref(q, k, v, rbt, rctx, d ** -0.5, streaming_kv=torch.ones(hkv, dtype=torch.bool),
                                sink=0, recent=0, stream_sink=0, stream_local=window,
                                units=torch.full((t, hkv, 1), -1, dtype=torch.int32))
    assert rel_err(out, want) < 1e-2


@needs_kernels
@pytest.mark.parametrize("hq,hkv,shared", [(8, 2, False), (8, 2, True), (32, 8, True)])
def test_sparse_decode_verifies_several_queries_as_decodes_at_their_positions(hq, hkv, shared):
    from needle.attention.kernels.paged_decode import sparse_decode

    gen = torch.Generator().manual_seed(11 * hq + shared)
    ut, d, dtype = 32, 128, torch.float16
    lens, qlens = [700, 90, 1000, 65], [4, 1, 8, 5]  # 65 - 5: the oldest query's newest unit is earlier
    _, k, v, _, _, bt, ctx = _decode_case(gen, hq, hkv, d, dtype, lens)
    starts, t, nq = _verify_case(gen, lens, qlens)
    q = torch.randn(t, hq, d, generator=gen).to(dtype).to(DEVICE)
    rows = hkv if shared else hq
    units = torch.full((len(lens), rows, 6), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for r in range(rows):  # drawn from the units the oldest query may choose, as a selection is
            first = n - qlens[b] + 1
            pick = 1 + torch.randperm(max(1, (first - 1) // ut - 2), generator=gen)[:5]
            units[b, r, : pick.numel()] = pick.int()
    units = units.to(DEVICE)
    streaming = (torch.arange(hkv) % 2 == 1).int().to(DEVICE)
    for recent, recent_units in ((40, 0), (0, 2)):
        kw = dict(unit_tokens=ut, sink=32, recent=recent, recent_units=recent_units, stream_sink=8,
                  stream_local=50)
        out = sparse_decode(q, k, v, bt, ctx, units, streaming, scale=d ** -0.5, query_start_loc=starts,
                            max_query_len=nq, **kw)
        rctx, rbt, runits = ref.verify_as_decodes(starts, ctx, bt, units)
        want = ref.paged_decode_ref(q, k, v, rbt, rctx, d ** -0.5, streaming_kv=streaming.bool(),
                                    units=runits, **kw)
        assert rel_err(out, want) < 1e-2


@needs_kernels
@pytest.mark.parametrize("hq,hkv,shared", [(8, 2, False), (8, 2, True), (4, 4, False), (16, 2, True)])
@pytest.mark.parametrize("page_size,ut", [(16, 64), (64, 64), (16, 16)])
def test_page_scores_match_reference(hq, hkv, shared, page_size, ut):
    from needle.attention.kernels.page_select import page_scores

    gen = torch.Generator().manual_seed(hq + page_size + ut)
    lens = [1000, 33, 500]
    q, k, v, kmin, kmax, bt, ctx = _decode_case(gen, hq, hkv, 128, torch.bfloat16, lens, page_size)
    got = page_scores(q, kmin, kmax, bt, ctx, page_size=page_size, unit_tokens=ut, shared=shared)
    want = ref.page_scores_ref(q, kmin, kmax, bt, ctx, 16, ut, shared=shared)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert rel_err(got[fin], want[fin]) < 1e-5


@needs_kernels
def test_page_scores_fed_the_mean_as_both_bounds_give_the_mean_logit():
    """The mean page score reuses the bound kernel: relu(q).m + min(q, 0).m = q.m."""
    from needle.attention.kernels.page_select import page_scores

    gen = torch.Generator().manual_seed(5)
    q, k, v, _, kmean, bt, ctx = _decode_case(gen, 8, 2, 128, torch.bfloat16, [700, 70], 16)
    got = page_scores(q, kmean, kmean, bt, ctx, page_size=16, unit_tokens=16, shared=False)
    pages = kmean[bt.long()].reshape(2, -1, 2, 128).float()  # [B, L, Hkv, D]
    want = torch.einsum("bhgd,blhd->bhgl", q.float().view(2, 2, 4, 128), pages).reshape(2, 8, -1)
    fin = torch.isfinite(got)
    for row, pages_used in ((0, 44), (1, 5)):  # contexts 700 and 70: -inf past the last page
        assert fin[row, :, :pages_used].all() and not fin[row, :, pages_used:].any()
    assert rel_err(got[fin], want[fin]) < 1e-5


@needs_kernels
@pytest.mark.parametrize("nu,k", [(40, 8), (300, 64), (2048, 64), (10, 16)])
def test_top_units_matches_reference(nu, k):
    from needle.attention.kernels.page_select import Choosable, top_units
    from needle.attention.sparse import allowed_units

    gen = torch.Generator().manual_seed(nu + k)
    b, r = 3, 5
    scores = torch.randn(b, r, nu, generator=gen).to(DEVICE)
    for lens in ([nu * 16, nu * 8, 100], [0, 1, 17 * 16 + 1]):
        ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        allowed = allowed_units(ctx, nu, 16, 2, 4)
        got = top_units(scores, allowed, k)
        want = ref.select_units_ref(scores, allowed, k)
        assert torch.equal(got.cpu(), want.cpu())
        k_each = torch.tensor([k, max(1, k // 2), 3], dtype=torch.int32, device=DEVICE)
        got = top_units(scores, allowed, k, k_each)
        assert torch.equal(got.cpu(), ref.select_units_ref(scores, allowed, k, k_each).cpu())
        # the rule instead of the mask, written into a wider buffer's first k columns (the kept selections)
        kept = torch.full((b, r, k + 3), 7, dtype=torch.int32, device=DEVICE)
        got = top_units(scores, Choosable(ctx, 16, 2, 4), k, out=kept[:, :, :k])
        assert torch.equal(got.cpu(), want.cpu()) and bool((kept[:, :, k:] == 7).all())


@needs_kernels
@pytest.mark.parametrize("hq,hkv,d,dtype", [(8, 2, 64, torch.float16), (8, 8, 128, torch.bfloat16)])
@pytest.mark.parametrize("lq,lk", [(300, 300), (100, 450)])
def test_prefill_matches_reference(hq, hkv, d, dtype, lq, lk):
    from needle.attention.kernels.prefill import prefill_dense, prefill_streaming

    gen = torch.Generator().manual_seed(lq + lk + d)
    q = torch.randn(lq, hq, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(lk, hkv, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(lk, hkv, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    dense = prefill_dense(q, k, v, scale)
    assert rel_err(dense, ref.prefill_ref(q, k, v, scale, q_offset=lk - lq)) < 1e-2
    stream = prefill_streaming(q, k, v, scale, sink=20, local=64, block=48)
    want = ref.prefill_ref(q, k, v, scale, q_offset=lk - lq, sink=20, local=64)
    assert rel_err(stream, want) < 1e-2


def test_references_agree_with_each_other():
    """CPU: the paged reference equals plain softmax attention over the gathered context."""
    gen = torch.Generator().manual_seed(0)
    bt = random_tables([50], 16, 8, gen)
    k = torch.randn(8, 16, 2, 32, generator=gen)
    v = torch.randn(8, 16, 2, 32, generator=gen)
    q = torch.randn(1, 4, 32, generator=gen)
    ctx = torch.tensor([50])
    out = ref.paged_decode_ref(q, k, v, bt, ctx, 0.2)
    kk = ref.gather_tokens(k, bt[0], torch.arange(50)).double()
    vv = ref.gather_tokens(v, bt[0], torch.arange(50)).double()
    for h in range(4):
        p = torch.softmax(kk[:, h // 2] @ q[0, h].double() * 0.2, 0)
        assert torch.allclose(out[0, h], p @ vv[:, h // 2])
    full = ref.prefill_ref(q[0][None], kk, vv, 0.2, q_offset=49)[0]
    assert torch.allclose(full, out[0])


@needs_kernels
@pytest.mark.parametrize("hq,hkv,d,dtype", [(8, 2, 64, torch.float16), (8, 4, 128, torch.bfloat16),
                                            (4, 2, 64, torch.float32)])
@pytest.mark.parametrize("n,ctx", [(700, 700), (300, 1100), (5, 2000)])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_block_sparse_prefill_matches_reference(hq, hkv, d, dtype, n, ctx, density):
    from needle.attention.kernels.block_prefill import (
        block_sparse_prefill,
        block_sparse_prefill_torch,
        prefill_blocks,
    )

    gen = torch.Generator().manual_seed(n + ctx + d)
    q = torch.randn(n, hq, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(ctx, hkv, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(ctx, hkv, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    qg = q.view(n, hkv, hq // hkv, d)
    blocks = prefill_blocks(qg, k, scale, density)
    got = block_sparse_prefill(q, k, v, scale, blocks)
    want = block_sparse_prefill_torch(qg.double(), k.double(), v.double(), scale, blocks)
    assert rel_err(got, want.view(n, hq, d)) < (1e-5 if dtype == torch.float32 else 1e-2)
    if density == 1.0:
        assert rel_err(got, ref.prefill_ref(q, k, v, scale, q_offset=ctx - n)) < 1e-2
