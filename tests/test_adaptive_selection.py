"""The adaptive levers of sparse selection: Twilight's top-p budget (--sparse-top-p) and reselection on
query drift (--sparse-drift), on random KV with a planted fact, through the CLI and the real model."""

from __future__ import annotations

import random

import pytest
import torch
from support import run_engine
from test_sparse_backend import HKV, HQ, LAYERS, Batch, D, _backend

from needle.attention.policies.base import top_p_cut
from needle.attention.sparse import SparseBackend
from needle.engine.calibrate import passkey_prompt
from needle.engine.config import EngineArgs
from needle.engine.llm import LLM
from needle.scheduler.sampling_params import SamplingParams
from needle.server.cli import main

FACT = torch.zeros(D)
FACT[0] = 8.0  # a key direction: a query along it puts nearly all its attention on the planted unit


def test_top_p_cut_keeps_the_shortest_prefix_holding_p():
    allowed = torch.ones(1, 8, dtype=torch.bool)
    units = torch.arange(8).view(1, 1, 8)
    peaked = torch.tensor([[[9.0, 0, 0, 0, 0, 0, 0, 0]]])
    flat = torch.zeros(1, 1, 8)
    assert top_p_cut(units, peaked, allowed, 0.9, 0).tolist() == [[[0, -1, -1, -1, -1, -1, -1, -1]]]
    assert (top_p_cut(units, peaked, allowed, 0.9, 3) >= 0).sum() == 3  # the floor
    assert (top_p_cut(units, flat, allowed, 0.5, 0) >= 0).sum() == 4  # 4 of 8 equal units hold 0.5
    assert torch.equal(top_p_cut(units[..., :5], flat, allowed, 1.0, 0), units[..., :5])  # capped at k
    few = torch.tensor([[[2, 5, -1]]])  # fewer allowed units than k stay -1
    assert top_p_cut(few, flat, allowed, 1.0, 0).tolist() == [[[2, 5, -1]]]


def _step(sparse: SparseBackend, batch: Batch, steps: dict[int, int], fact_rows: range | None = None,
          query: torch.Tensor | None = None) -> None:
    """One step over every layer; the keys of `fact_rows` (rows of this step) in KV head 0 are FACT,
    and `query` (else random) is every query head's query of KV head 0's group."""
    meta = batch.meta(steps)
    sparse.begin_step(meta)
    for layer in range(LAYERS):
        q, k, v = batch.qkv(meta)
        if fact_rows is not None:
            k[fact_rows, 0] = FACT
        if query is not None:
            q[:, : HQ // HKV] = query
        sparse.forward(layer, q, k, v, meta)


def _chosen(sparse: SparseBackend, seq: int, layer: int = 2) -> list[int]:
    """The units retrieval KV head 0 keeps for the sequence (-1 = none)."""
    return sparse.table.units[layer][sparse.table.slots[seq], 0].tolist()


def _planted(query: torch.Tensor | None = None, **kw) -> tuple[SparseBackend, Batch]:
    """A sparse 400-token prefill whose positions 192..223 (unit 6 of 32 tokens) hold the fact in KV
    head 0; `query`: the prefill's queries of that head's group (else random)."""
    sparse = _backend(sparse_token_budget=320, **kw)  # k = 10 - 1 sink - 2 recent = 7 units
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    _step(sparse, batch, {1: 400}, fact_rows=range(192, 224), query=query)
    return sparse, batch


def test_top_p_reads_fewer_units_where_the_mass_is_concentrated_never_more_than_the_budget():
    fixed, fixed_batch = _planted()
    top_p, top_p_batch = _planted(sparse_top_p=0.9, sparse_top_p_floor=0)
    _step(fixed, fixed_batch, {1: 1}, query=FACT)
    _step(top_p, top_p_batch, {1: 1}, query=FACT)
    assert sum(u >= 0 for u in _chosen(fixed, 1)) == 7
    assert [u for u in _chosen(top_p, 1) if u >= 0] == [6]  # the planted unit holds > 0.9 of the mass
    assert top_p.drain_stats().tokens_read[0] < fixed.drain_stats().tokens_read[0]
    flat, batch = _planted(sparse_top_p=0.999, sparse_top_p_floor=0)
    _step(flat, batch, {1: 1})  # random queries: the mass spreads, top-p fills the budget's k and stops
    assert sum(u >= 0 for u in _chosen(flat, 1)) == 7


def test_top_p_cuts_the_prompt_aware_seed_too_and_keeps_its_floor():
    """The question (the window's queries) asks for the fact: its unit holds nearly all the window's
    exact mass, so the seed keeps it and, for the 64-token floor, one more unit."""
    for floor, kept in ((0, 1), (64, 2)):
        sparse, _ = _planted(FACT, sparse_top_p=0.9, sparse_top_p_floor=floor, sparse_observation_window=8)
        chosen = [u for u in _chosen(sparse, 1) if u >= 0]
        assert len(chosen) == kept and chosen[0] == 6


def test_drift_reselects_when_the_query_turns_and_not_when_it_holds():
    sparse, batch = _planted(sparse_drift=0.9, selector_interval=100)
    calls: list[int] = []
    select = sparse.policy.select
    sparse.policy.select = lambda req: calls.append(req.layer) or select(req)
    _step(sparse, batch, {1: 1}, query=FACT)  # the first selection (no kept one yet)
    first = sparse.drain_stats().drift_reselections
    calls.clear()
    for _ in range(3):
        _step(sparse, batch, {1: 1}, query=FACT)  # KV head 0's group asks the same
    assert sparse.drain_stats().drift_reselections == 0 and 2 not in calls
    _step(sparse, batch, {1: 1}, query=-FACT)  # it turns around
    assert sparse.drain_stats().drift_reselections > 0 and 2 in calls
    assert first == 0  # the first selection was due anyway, not a drift


def test_a_seeded_selection_is_kept_for_the_interval_whatever_the_drift():
    sparse, batch = _planted(sparse_drift=0.99, selector_interval=3, sparse_observation_window=8)
    seeded = _chosen(sparse, 1)
    for _ in range(3):
        _step(sparse, batch, {1: 1})  # random queries, far from any anchor
        assert _chosen(sparse, 1) == seeded
    assert sparse.drain_stats().drift_reselections == 0
    _step(sparse, batch, {1: 1})
    _step(sparse, batch, {1: 1})  # after the interval's reselection, drift applies
    assert sparse.drain_stats().drift_reselections > 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--sparse-top-p", "1.5"], "--sparse-top-p must be in"),
    (["--sparse-top-p-floor", "-1"], "--sparse-top-p-floor must be"),
    (["--sparse-drift", "1"], "--sparse-drift must be in"),
    (["--sparse-drift", "0.9", "--speculative-config", '{"method": "ngram"}'], "cannot be combined"),
])
def test_bad_adaptive_flags_exit_with_one_line(flags: list[str], message: str):
    with pytest.raises(SystemExit, match=message):
        main(["serve", *flags])


def test_top_p_is_refused_for_policies_that_do_not_score_units():
    for policy in ("hip", "recent"):
        with pytest.raises(ValueError, match="needs a policy that scores every unit"):
            _backend(sparse_top_p=0.9, sparse_policy=policy)
    with pytest.raises(ValueError, match="cannot be combined"):
        EngineArgs(sparse_drift=0.5, speculative_config='{"method": "self_sparse"}')


def test_the_bundled_model_answers_with_both_levers_reading_less(sparse_llm: LLM):
    """Through the engine (8K-capable default config, a 2K passkey prompt): the passkey survives top-p
    and drift; top-p reads fewer keys per step than the fixed budget, and drift does reselect."""
    backend, config = sparse_llm.engine.backend, sparse_llm.engine.sparse_config
    prompt, _, key = passkey_prompt(sparse_llm.tokenizer, 2000, 0.4, random.Random(7))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)

    def answer(top_p: float, drift: float) -> tuple[str, list[int], int]:
        backend.set_adaptive(top_p, 128, drift)
        stats = []
        try:
            tokens = run_engine(sparse_llm.engine, {"r": (prompt, greedy)}, on_step=stats.append)["r"]
        finally:
            backend.set_adaptive(config.top_p, config.top_p_floor, config.drift)
        reads = [n for s in stats for n in s.attention.tokens_read]
        return sparse_llm.tokenizer.decode(tokens), reads, sum(s.attention.drift_reselections for s in stats)

    text, fixed_reads, _ = answer(0.0, 0.0)
    top_text, top_reads, _ = answer(0.9, 0.0)
    drift_text, _, drifts = answer(0.0, 0.95)
    for t in (text, top_text, drift_text):
        assert key in t.replace(" ", "")
    assert sum(top_reads) / len(top_reads) < sum(fixed_reads) / len(fixed_reads)
    assert drifts > 0
