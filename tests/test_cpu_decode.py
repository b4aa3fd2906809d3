"""The in-place CPU decode kernel (attention/cpu_decode.py) against the torch path it replaces, on fresh
random caches: ragged contexts, grouped-query heads, verify rows, sliding windows, value tables, and
16-bit pages; sparse decode's position lists against the plain-torch reference; the KV write against
the pool's own."""

from __future__ import annotations

import math

import pytest
import torch

from needle.attention.base import AttentionMetadata
from needle.attention.cpu_decode import (
    PagedRows,
    in_place_decode,
    paged_decode,
    summarise_slots,
    unit_positions,
    write_kv,
)
from needle.attention.dense import DenseBackend
from needle.attention.sparse import unit_positions_torch
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.summaries import summarise_pages

PAGE = 16

pytestmark = pytest.mark.skipif(not in_place_decode(torch.zeros(1, 1, 1, 8)),
                                reason="the in-place kernel is not built here (no compiler or no AVX2)")


def random_pool(hkv: int, d: int, pages: int, dtype: torch.dtype = torch.float32,
                value_slots: list[int] | None = None) -> KVPool:
    spec = KVCacheSpec(2, hkv, d, PAGE, kv_dtype=None if dtype == torch.float32 else dtype)
    pool = KVPool(spec, pages, torch.device("cpu"), False, value_slots, offloaded_from=1)
    pool.k.copy_(torch.randn(pool.k.shape))
    for v in pool.v:
        v.copy_(torch.randn(v.shape))
    return pool


def step(contexts: list[int], query_lens: list[int], pages: int, value_pages: int | None = None,
         seed: int = 0, drafts: list[int] | None = None) -> AttentionMetadata:
    """Sequences at `contexts` tokens with scattered page tables (and value tables into value_pages);
    a sequence of several rows verifies drafts unless `drafts` says 0 (a prefill chunk)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // PAGE) for c in contexts]
    order = torch.randperm(pages, generator=gen).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(order[at:at + n])
        at += n
    values = None
    if value_pages is not None:
        slots = torch.randperm(value_pages, generator=gen).tolist()
        values, at = [], 0
        for n in needed:
            values.append(slots[at:at + n])
            at += n
    drafts = [n - 1 for n in query_lens] if drafts is None else drafts
    return AttentionMetadata.build(list(range(len(contexts))), query_lens, contexts, tables, PAGE, "cpu",
                                   modes=["dense"] * len(contexts), num_draft_tokens=drafts,
                                   value_tables=values, value_layers_from=1)


def both_paths(pool: KVPool, layer: int, q: torch.Tensor, meta: AttentionMetadata,
               window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = DenseBackend(pool)
    assert backend.in_place
    new = backend.attend(layer, q, meta, window)
    backend.in_place = False
    return new, backend.attend(layer, q, meta, window)


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 1), (2, 2)])
def test_decode_matches_torch_path(hq, hkv):
    torch.manual_seed(hq)
    pool = random_pool(hkv, 64, 300)
    meta = step([1, 15, 16, 17, 700, 2049], [1] * 6, 300)
    new, old = both_paths(pool, 0, torch.randn(6, hq, 64), meta)
    torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)


def test_verify_rows_and_windows_match_torch_path():
    torch.manual_seed(1)
    pool = random_pool(2, 32, 200)
    meta = step([5, 600, 1300], [3, 4, 2], 200, seed=1)
    q = torch.randn(9, 6, 32)
    for window in (None, 64, 300):
        new, old = both_paths(pool, 0, q, meta, window)
        torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)
    plain = step([600, 1300], [1, 1], 200, seed=2)
    new, old = both_paths(pool, 0, torch.randn(2, 6, 32), plain, 100)
    torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)


def test_decode_rows_beside_a_prefill_chunk_match_torch_path():
    torch.manual_seed(5)
    pool = random_pool(3, 64, 200)
    meta = step([40, 700, 900, 300], [6, 3, 1, 40], 200, seed=4, drafts=[0, 2, 0, 0])
    assert not meta.decodes_only
    new, old = both_paths(pool, 0, torch.randn(50, 9, 64), meta)
    torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)


def test_values_read_through_value_tables():
    torch.manual_seed(2)
    pool = random_pool(3, 64, 120, value_slots=[150])
    for query_lens in ([1, 1], [2, 3]):
        meta = step([400, 1000], query_lens, 120, value_pages=150, seed=3)
        q = torch.randn(sum(query_lens), 9, 64)
        new, old = both_paths(pool, 1, q, meta)  # layer 1 reads values through the value tables
        torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_pages(dtype):
    torch.manual_seed(3)
    pool = random_pool(3, 64, 100, dtype)
    meta = step([33, 900], [1, 1], 100)
    new, old = both_paths(pool, 0, torch.randn(2, 9, 64), meta)
    torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-4)


def test_position_lists_match_reference():
    """Sparse decode's form: each (row, head) reads its own valid positions, with log-sum-exp."""
    torch.manual_seed(4)
    pool = random_pool(4, 64, 80)
    meta = step([300, 900], [1, 1], 80)
    heads = torch.tensor([3, 1])  # the query groups read KV heads 3 and 1
    q = torch.randn(2, 2, 2, 64)
    pos = torch.randint(0, 300, (2, 2, 70))
    valid = torch.rand(2, 2, 70) < 0.7
    rows = PagedRows.sparse(meta.page_tables, meta.page_tables, pos, valid)
    out, lse = paged_decode(q, pool.k[0], pool.v[0], rows, 0.125, heads)
    for b in range(2):
        for h in range(2):
            p = pos[b, h][valid[b, h]]
            slots = meta.page_tables[b].long()[p // PAGE] * PAGE + p % PAGE
            keys = pool.k[0].view(-1, 4, 64)[slots, heads[h]].double()
            values = pool.v[0].view(-1, 4, 64)[slots, heads[h]].double()
            scores = q[b, h].double() @ keys.T * 0.125
            torch.testing.assert_close(out[b, h].double(), scores.softmax(-1) @ values, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lse[b, h].double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    none_valid = PagedRows.sparse(meta.page_tables, meta.page_tables, pos, torch.zeros_like(valid))
    assert math.isinf(paged_decode(q, pool.k[0], pool.v[0], none_valid, 0.125, heads)[1][0, 0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_summaries_in_one_call_equal_the_torch_recomputation(seed, dtype):
    """Scattered and repeated slots (a prefill chunk, decode rows, a rewrite after rollback) give the
    very bits summarise_pages gives, so the sparse policies rank the same units either way; 16-bit key
    pages are summarised in float32 by both."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(40, 64, 3, 64, generator=gen).to(dtype)
    def empty():
        shape = (40, 4, 3, 64)
        return torch.full(shape, math.inf), torch.full(shape, -math.inf), torch.zeros(shape)
    for n in (1, 7, 300):
        slots = torch.randint(0, 40 * 64, (n,), generator=gen)
        want, got = empty(), empty()
        summarise_pages(k, want, slots, 16)
        summarise_slots(k, got, slots, 16)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_unit_positions_match_the_torch_rule(seed):
    """Sparse decode's read lists in one call equal the torch rule's, bit for bit, on fresh random
    units: some negative (unused), some past the allowed width, some not allowed, some past a row's k,
    units that cross the context's end, and no chosen units at all."""
    gen = torch.Generator().manual_seed(seed)
    b, h, unit, width = 3, 4, 16, 40
    ctx = torch.randint(unit * 20, unit * width, (b,), generator=gen)
    sink = (torch.randint(0, 64, (b, 32), generator=gen), torch.rand(b, 32, generator=gen) < 0.9)
    recent = (torch.randint(0, 600, (b, 48), generator=gen), torch.rand(b, 48, generator=gen) < 0.8)
    allowed = torch.rand(b, width, generator=gen) < 0.7
    for k in (0, 1, 9):
        chosen = torch.randint(-2, width + 3, (b, h, k), generator=gen)
        within_k = torch.rand(b, k, generator=gen) < 0.8
        got = unit_positions(chosen, allowed, within_k, ctx, unit, sink, recent)
        want = unit_positions_torch(chosen, allowed, within_k, ctx, unit, sink, recent)
        for a, w in zip(got, want, strict=True):
            assert torch.equal(a, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_write_in_one_call_equals_the_pools(dtype):
    """write_kv against KVPool.write (torch's casts) on fresh rows with outliers, infinities and a NaN,
    into a layer whose values live in their own slots (value_slots)."""
    fast, ref = (random_pool(3, 64, 12, dtype, value_slots=[20]) for _ in range(2))
    ref.k.copy_(fast.k)
    for a, b in zip(ref.v, fast.v, strict=True):
        a.copy_(b)
    k, v = torch.randn(5, 3, 64) * 1e3, torch.randn(5, 3, 64)
    k[0, 0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    v[1, 2, 5] = 1e-9
    slots, value_slots = torch.tensor([3, 40, 41, 100, 191]), torch.tensor([0, 17, 200, 319, 5])
    for layer, values in ((0, None), (1, value_slots)):
        write_kv(fast, layer, k, v, slots, values)
        ref.write(layer, k, v, slots, values)
    for a, b in zip([fast.k, *fast.v], [ref.k, *ref.v], strict=True):
        nan = a.isnan()
        assert torch.equal(nan, b.isnan())  # a NaN's bits differ between torch's own cast paths
        assert torch.equal(a[~nan].view(torch.uint8), b[~nan].view(torch.uint8))
