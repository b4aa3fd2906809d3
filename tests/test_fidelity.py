"""Sparse fidelity: prompt-aware selection (observation window) and the recall guard, on random KV and
through the real bundled model."""

from __future__ import annotations

import random

import pytest
import torch
from support import run_engine
from test_server_units import samples
from test_sparse_backend import LAYERS, Batch, _backend

from needle.attention.base import AttentionStats
from needle.attention.policies.base import top_units
from needle.attention.sparse import allowed_units, window_mass
from needle.engine.calibrate import passkey_prompt
from needle.engine.llm import LLM
from needle.engine.stats import StepStats
from needle.kvcache.page_allocator import PageAllocator, SeqPages
from needle.scheduler.sampling_params import SamplingParams
from needle.server.metrics import Metrics


def _mass_reference(q: torch.Tensor, keys: torch.Tensor, ctx: int, unit: int, scale: float) -> torch.Tensor:
    """Row by row: query j at position ctx - w + j softmaxes over keys 0..its position; sum per unit."""
    w, h, g, _ = q.shape
    units = -(-(ctx + 1) // unit)
    out = torch.zeros(h, g, units, dtype=torch.float64)
    for j in range(w):
        pos = ctx - w + j
        for head in range(h):
            probs = torch.softmax(q[j, head].double() @ keys[: pos + 1, head].double().T * scale, dim=-1)
            for t in range(pos + 1):
                out[head, :, t // unit] += probs[:, t]
    return out


def test_window_mass_matches_a_row_by_row_softmax():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(5, 2, 3, 8, generator=gen), torch.randn(70, 2, 8, generator=gen)
    got = window_mass(q, keys, 70, 16, 0.35)
    want = _mass_reference(q, keys, 70, 16, 0.35)
    assert got.shape == (2, 3, 5)  # units of 16 over 71 positions (the first decode step's context)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(dim=-1), torch.full((2, 3), 5.0))  # each query's mass sums to 1


def _prefill(sparse, batch: Batch, steps: dict[int, int], capture: dict | None = None):
    meta = batch.meta(steps)
    sparse.begin_step(meta)
    for layer in range(LAYERS):
        q, k, v = batch.qkv(meta)
        if capture is not None:
            capture[layer] = q
        sparse.forward(layer, q, k, v, meta)


@pytest.mark.parametrize("selection", ["kv-head", "query-head"])
def test_observation_window_seeds_the_first_decode_steps(selection: str):
    """After a sparse prefill, the retrieval head's selection is the top units by the window's exact
    attention mass; the policy is not consulted until the reselection interval ends."""
    sparse = _backend(sparse_observation_window=8, selector_interval=3, sparse_selection=selection,
                      sparse_token_budget=256)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    queries: dict[int, torch.Tensor] = {}
    _prefill(sparse, batch, {7: 400}, queries)
    layer, head = 2, 0  # MIXED: KV head 0 retrieves, KV head 1 streams
    keys = batch.pool.k[layer].view(-1, 2, 16)[torch.tensor(batch.pages[7]).repeat_interleave(16) * 16
                                             + torch.arange(16).repeat(len(batch.pages[7]))][:400]
    qg = queries[layer].view(400, 2, 3, 16)[-8:, head:head + 1]
    mass = _mass_reference(qg, keys[:, head:head + 1], 400, sparse.unit, sparse.scale)[0]  # [G, U]
    allowed = allowed_units(torch.tensor([401]), mass.shape[-1], sparse.unit, sparse.num_sink_units,
                            sparse.num_recent_units)
    k = 256 // sparse.unit - sparse.num_sink_units - sparse.num_recent_units
    assert k == 5
    slot = sparse.table.slots[7]
    if selection == "kv-head":
        want = top_units(mass.sum(0)[None, None], allowed, k)[0, 0]
        assert sorted(sparse.table.units[layer][slot, head, :k].tolist()) == sorted(want.tolist())
    else:
        want = top_units(mass[None], allowed, k)[0]
        got = sparse.table.units[layer][slot, :3, :k]
        assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]
    seeded = sparse.table.units[layer][slot].clone()
    calls = []
    select = sparse.policy.select
    sparse.policy.select = lambda req: calls.append(req.layer) or select(req)
    for step in range(4):
        _prefill(sparse, batch, {7: 1})
        if step < 3:
            assert torch.equal(sparse.table.units[layer][slot], seeded) and not calls
    assert calls  # the fourth decode step reselects by the query


def test_without_the_window_nothing_is_seeded_and_recent_ignores_it():
    for kw in ({}, {"sparse_observation_window": 8, "sparse_policy": "recent"}):
        sparse = _backend(**kw)
        batch = Batch()
        sparse.pool, sparse.dense.pool = batch.pool, batch.pool
        _prefill(sparse, batch, {3: 400})
        assert 3 not in sparse.table.slots


def test_guard_widens_a_low_recall_budget_until_the_sequence_runs_dense():
    """An unreachable threshold: the first decode step's recall (always sampled under the guard) widens
    128 -> 256, sampled steps keep doubling, and once the budget holds the context it runs dense."""
    sparse = _backend(sparse_min_recall=1.01, sparse_recall_sample=1.0, sparse_token_budget=128)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    _prefill(sparse, batch, {1: 500})
    for _ in range(4):
        _prefill(sparse, batch, {1: 1})
    stats = sparse.drain_stats()
    assert stats.guard_widenings == 2  # 128 -> 256 -> 512, which holds the 501..504-token context
    assert stats.dense_fallbacks == 2 and len(stats.recall_samples) == 2


def test_guard_samples_each_sequence_once_and_keeps_a_good_selection():
    sparse = _backend(sparse_min_recall=0.05, sparse_recall_sample=0.0, sparse_token_budget=128)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    _prefill(sparse, batch, {1: 500, 2: 300})
    for _ in range(3):
        _prefill(sparse, batch, {1: 1, 2: 1})
    stats = sparse.drain_stats()
    assert len(stats.recall_samples) == 2  # the first decode step of each, nothing after
    assert stats.guard_widenings == 0 and stats.dense_fallbacks == 0


def test_prefix_cache_leaves_the_observation_window_to_compute():
    ids = list(range(100))
    for tail, cached in ((1, 96), (32, 64)):  # pages of 16; the window's queries must run
        bm = PageAllocator(16, 16, uncached_tail=tail)
        first = SeqPages()
        bm.allocate(first, ids, 200)
        bm.commit_full_pages(first, ids, len(ids))
        assert bm.allocate(SeqPages(), ids, 200) == cached


def test_guard_widenings_are_exported():
    m = Metrics("tiny")
    m.on_step(StepStats(attention=AttentionStats(guard_widenings=3)))
    assert samples(m)[("needle:sparse_guard_widenings_total", ())] == 3


@pytest.fixture(scope="module")
def window_llm() -> LLM:
    """The bundled model with prompt-aware selection, settings that make a 1.5K prompt prefill sparsely."""
    return LLM(attention="sparse", max_num_seqs=4, kv_cache_memory="512MiB", sparse_observation_window=32,
               prefill_local_tokens=256, sparse_token_budget=512, enable_prefix_caching=False)


def _first_decode_selection(llm: LLM, prompt: list[int], window: int) -> tuple[str, dict[int, torch.Tensor]]:
    """Greedy answer, and the units each sparse layer's retrieval heads read at the first decode step."""
    backend = llm.engine.backend
    backend.observation_window = window
    llm.engine.allocator.uncached_tail = max(1, window)
    first: dict[int, torch.Tensor] = {}
    chosen = backend._chosen_units

    def record(layer, q, kv_heads, plan):
        units = chosen(layer, q, kv_heads, plan)
        first.setdefault(layer, units.clone())
        return units

    backend._chosen_units = record
    try:
        tokens = run_engine(llm.engine, {"r": (prompt, SamplingParams(temperature=0.0, max_tokens=9))})["r"]
    finally:
        del backend._chosen_units
    return llm.tokenizer.decode(tokens), first


def test_engine_seeds_the_first_selection_and_still_answers(window_llm: LLM):
    """Through the engine: with the window, the first decode step reads other units than the first
    query alone picks, and the answer is still the passkey."""
    prompt, _, key = passkey_prompt(window_llm.tokenizer, 1500, 0.3, random.Random(4))
    text, seeded = _first_decode_selection(window_llm, prompt, 32)
    _, plain = _first_decode_selection(window_llm, prompt, 0)
    assert key in text.replace(" ", "")
    assert seeded.keys() == plain.keys() and seeded  # the layers that have retrieval heads
    assert any(not torch.equal(seeded[n], plain[n]) for n in seeded)
