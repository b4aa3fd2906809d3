"""Key summaries (min, max, mean) stay exact: appends across page boundaries, partial pages, pages reused
after free."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.summaries import update_summaries

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=32, summary_tokens=16)


def _append(pool: KVPool, pages: list[int], start: int, keys: torch.Tensor) -> None:
    """Write keys for positions start.. of a sequence living in `pages`, in both layers."""
    pos = torch.arange(start, start + keys.shape[0])
    slots = torch.tensor(pages)[pos // SPEC.page_size] * SPEC.page_size + pos % SPEC.page_size
    for layer in range(SPEC.num_layers):
        pool.write(layer, keys, keys, slots)
        update_summaries(pool, layer, slots)


def _assert_exact(pool: KVPool, pages: list[int], keys: torch.Tensor) -> None:
    """Every summary the sequence has touched summarises exactly its written keys."""
    sb = SPEC.summary_tokens
    for layer in range(SPEC.num_layers):
        for block in range(-(-keys.shape[0] // sb)):
            page, sub = pages[block * sb // SPEC.page_size], block % (SPEC.page_size // sb)
            chunk = keys[block * sb:(block + 1) * sb]
            torch.testing.assert_close(pool.kmin[layer, page, sub], chunk.amin(0), rtol=0, atol=0)
            torch.testing.assert_close(pool.kmax[layer, page, sub], chunk.amax(0), rtol=0, atol=0)
            torch.testing.assert_close(pool.kmean[layer, page, sub], chunk.mean(0), rtol=1e-6, atol=1e-6)


def test_appends_across_page_boundaries_keep_summaries_exact():
    pool = KVPool(SPEC, num_pages=8, device=torch.device("cpu"), with_summaries=True)
    pages = [5, 2, 7]
    keys = torch.randn(90, SPEC.num_kv_heads, SPEC.head_dim)
    written = 0
    for n in (7, 9, 1, 20, 1, 1, 40, 11):  # partial blocks, block and page boundaries, single decodes
        _append(pool, pages, written, keys[written:written + n])
        written += n
        _assert_exact(pool, pages, keys[:written])


def test_reused_page_forgets_the_previous_owner():
    pool = KVPool(SPEC, num_pages=4, device=torch.device("cpu"), with_summaries=True)
    _append(pool, [1, 2], 0, torch.full((64, SPEC.num_kv_heads, SPEC.head_dim), 100.0))
    fresh = torch.randn(21, SPEC.num_kv_heads, SPEC.head_dim)
    _append(pool, [2, 1], 0, fresh[:5])
    _append(pool, [2, 1], 5, fresh[5:])
    _assert_exact(pool, [2, 1], fresh)


def test_rewritten_rows_after_rollback_drop_the_rejected_keys():
    pool = KVPool(SPEC, num_pages=2, device=torch.device("cpu"), with_summaries=True)
    keys = torch.randn(12, SPEC.num_kv_heads, SPEC.head_dim)
    _append(pool, [0], 0, keys)
    _append(pool, [0], 8, torch.full((4, SPEC.num_kv_heads, SPEC.head_dim), 50.0))  # rejected drafts
    _append(pool, [0], 8, keys[8:10])  # rewritten after rollback: rows 10, 11 are no longer valid
    _assert_exact(pool, [0], keys[:10])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 64), scale=st.floats(0.01, 100.0))
def test_upper_bound_covers_every_key_of_its_page(seed: int, length: int, scale: float):
    """Quest's bound sum_c max(q_c kmin_c, q_c kmax_c) >= q.k for every key summarised by the page."""
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(SPEC, num_pages=2, device=torch.device("cpu"), with_summaries=True)
    keys = torch.randn(length, SPEC.num_kv_heads, SPEC.head_dim, generator=gen) * scale
    _append(pool, [0, 1], 0, keys)
    q = torch.randn(SPEC.num_kv_heads, SPEC.head_dim, generator=gen) * scale
    sb = SPEC.summary_tokens
    for pos in range(length):
        page, sub = pos // SPEC.page_size, (pos % SPEC.page_size) // sb
        kmin, kmax = pool.kmin[0, page, sub], pool.kmax[0, page, sub]
        bound = torch.maximum(q * kmin, q * kmax).sum(-1)
        exact = (q * keys[pos]).sum(-1)
        assert torch.all(bound >= exact - 1e-4 * scale * scale)
