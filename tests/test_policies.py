"""Each selection policy returns distinct allowed units, best first, and finds a planted needle."""

from __future__ import annotations

import pytest
import torch

from needle.attention.policies import POLICIES, SelectionRequest
from needle.attention.policies.base import PAGE_SCORES
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.summaries import update_summaries

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=32)
CTX = 2048


def _request(policy_name: str, needle: range, k: int, heads: int = 2,
             spec: KVCacheSpec = SPEC) -> tuple[SelectionRequest, int]:
    """One sequence of CTX random keys; keys in `needle` align with the query of every head."""
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(spec, CTX // spec.page_size, torch.device("cpu"), with_summaries=True)
    keys = torch.randn(CTX, SPEC.num_kv_heads, SPEC.head_dim, generator=gen) * 0.1
    q = torch.randn(1, heads, 1, SPEC.head_dim, generator=gen)
    keys[list(needle)] = q[0, :, 0] * 3
    slots = torch.arange(CTX)
    pool.write(0, keys, keys, slots)
    update_summaries(pool, 0, slots)
    policy = POLICIES[policy_name](unit_tokens=64, summary_tokens=SPEC.summary_tokens)
    num_units = CTX // policy.unit_tokens
    allowed = torch.ones(1, num_units, dtype=torch.bool)
    allowed[0, :1] = allowed[0, -2:] = False  # sink and recent units are the backend's
    req = SelectionRequest(pool, 0, q, torch.arange(heads) % SPEC.num_kv_heads,
                           torch.arange(CTX // SPEC.page_size)[None], torch.tensor([CTX]), allowed, k)
    return req, policy.unit_tokens


QUERY_DRIVEN = [("hip", "bound"), *[(n, s) for n in ("quest", "hierarchical") for s in PAGE_SCORES]]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("name", ["hip", "quest", "hierarchical"])
def test_policies_select_over_two_and_one_byte_pages(name: str, kv_dtype: torch.dtype):
    """--kv-cache-dtype float16 / bfloat16 / fp8: pages in another dtype than the fp32 query still find
    the needle (HiP's probes read keys from the pages; it failed on float16 pages)."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=32, kv_dtype=kv_dtype)
    req, unit = _request(name, range(1200, 1328), k=12, spec=spec)
    units = POLICIES[name](64, 16, "bound").select(req)
    assert units.shape == (1, 2, 12)
    for head in units[0].tolist():
        assert len(set(head)) == 12 and all(req.allowed[0, u] for u in head)
        assert set(range(1200 // unit, 1328 // unit)) & set(head)


@pytest.mark.parametrize("name,score", QUERY_DRIVEN)
def test_selection_is_distinct_allowed_units_and_finds_the_needle(name: str, score: str):
    needle = range(1200, 1328)  # two 64-token units, eight summaries
    req, unit = _request(name, needle, k=12)
    units = POLICIES[name](64, 16, score).select(req)
    assert units.shape == (1, 2, 12)
    for head in units[0]:
        assert len(set(head.tolist())) == 12
        assert bool(req.allowed[0, head].all())
        needle_units = set(range(needle.start // unit, needle.stop // unit))
        assert needle_units & set(head.tolist())
        if name != "hip":  # the bound never misses; HiP's probes may skip part of a wide needle
            assert needle_units <= set(head.tolist())


@pytest.mark.parametrize("name", ["quest", "hierarchical"])
@pytest.mark.parametrize("score", PAGE_SCORES)
def test_summary_policies_rank_a_single_page_needle_first(name: str, score: str):
    """Both page scores see one 16-token page of aligned keys; the needle's unit comes first."""
    req, unit = _request(name, range(1616, 1632), k=4)
    units = POLICIES[name](64, 16, score).select(req)
    assert torch.all(units[0, :, 0] == 1616 // unit)


def test_streaming_baseline_reads_the_newest_allowed_units_whatever_the_query():
    req, unit = _request("recent", range(1200, 1328), k=12)
    units = POLICIES["recent"](64, 16).select(req)
    newest = req.allowed.shape[1] - 3  # the last two units are the backend's recent ones
    assert units[0].tolist() == [list(range(newest, newest - 12, -1))] * 2


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fewer_allowed_units_than_k_pads_with_minus_one(name: str):
    req, unit = _request(name, range(0), k=8)
    req.allowed[:] = False
    req.allowed[0, 5:8] = True
    units = POLICIES[name](64, 16, "bound").select(req)
    for head in units[0].tolist():
        assert sorted(head[:3]) == [5, 6, 7] and head[3:] == [-1] * 5
