"""SparseBackend against the dense backend and masked references, on a KV pool of random data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.attention.head_profile import HeadProfile
from needle.attention.sparse import SparseBackend
from needle.engine.config import EngineArgs
from needle.kvcache.pool import KVCacheSpec, KVPool

LAYERS, HQ, HKV, D, PAGE = 3, 6, 2, 16, 16
SPEC = KVCacheSpec(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, page_size=PAGE)


class Batch:
    """Sequences with pages handed out in a scrambled order, stepped with random q/k/v."""

    def __init__(self, num_pages: int = 256, seed: int = 0):
        self.pool = KVPool(SPEC, num_pages, torch.device("cpu"), with_summaries=True)
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.gen = torch.Generator().manual_seed(seed + 1)

    def meta(self, steps: dict[int, int], modes: dict[int, str] | None = None,
             budgets: dict[int, int] | None = None) -> AttentionMetadata:
        """Metadata for one step in which sequence s brings steps[s] new tokens."""
        for sid, n in steps.items():
            self.lens[sid] = self.lens.get(sid, 0) + n
            pages = self.pages.setdefault(sid, [])
            while len(pages) * PAGE < self.lens[sid]:
                pages.append(self.free.pop())
        return AttentionMetadata.build(
            seq_ids=list(steps), query_lens=list(steps.values()), context_lens=[self.lens[s] for s in steps],
            page_tables=[self.pages[s] for s in steps], page_size=PAGE, device="cpu",
            modes=[(modes or {}).get(s, "sparse") for s in steps],
            token_budgets=[(budgets or {}).get(s, 0) for s in steps])

    def qkv(self, meta: AttentionMetadata):
        t = int(meta.query_start_loc[-1])
        return (torch.randn(t, HQ, D, generator=self.gen), torch.randn(t, HKV, D, generator=self.gen),
                torch.randn(t, HKV, D, generator=self.gen))


def _args(**kw) -> EngineArgs:
    base = dict(sparse_token_budget=128, sparse_unit_tokens=32, dense_layers=1, sink_tokens=16,
                local_tokens=32, retrieval_local_tokens=32, prefill_local_tokens=48, selector_interval=2,
                sparse_recall_sample=0.0, sparse_observation_window=0)  # query-driven selection only
    base.update(kw)
    return EngineArgs(**base)


def _profile(streaming: list[list[bool]]) -> HeadProfile:
    return HeadProfile("test", [[1.0] * HKV for _ in range(LAYERS)], streaming)


MIXED = _profile([[False, True]] * LAYERS)


def _run_both(batch_steps, sparse: SparseBackend, seed: int = 0, **meta_kw):
    """Feed the same steps to a sparse and a dense backend over twin pools; yield both outputs."""
    a, b = Batch(seed=seed), Batch(seed=seed)
    sparse.pool, sparse.dense.pool = a.pool, a.pool
    dense = DenseBackend(b.pool)
    for steps in batch_steps:
        ma, mb = a.meta(steps, **meta_kw), b.meta(steps, **meta_kw)
        q, k, v = a.qkv(ma)
        b.qkv(mb)
        sparse.begin_step(ma)
        dense.begin_step(mb)
        for layer in range(LAYERS):
            yield layer, sparse.forward(layer, q, k, v, ma), dense.forward(layer, q, k, v, mb)


def _backend(profile: HeadProfile = MIXED, **kw) -> SparseBackend:
    pool = KVPool(SPEC, 4, torch.device("cpu"), with_summaries=True)
    return SparseBackend(pool, _args(**kw).sparse_config("cpu"), profile, HQ, HKV)


@pytest.mark.parametrize("policy", ["hierarchical", "quest", "hip"])
def test_sparse_equals_dense_exactly_when_the_budget_covers_the_context(policy: str):
    steps = [{1: 40, 2: 100}, {1: 60, 2: 1}, *[{1: 1, 2: 1}] * 5]  # chunked prefill, mixed, decodes
    for _, got, want in _run_both(steps, _backend(sparse_token_budget=512, sparse_policy=policy)):
        assert torch.equal(got, want)


def test_prefill_inside_the_streaming_window_is_dense_whatever_the_budget():
    """Sinks + prefill window cover these chunks, so their KV (and the prefix-cache key) is the same for
    every budget up to that span: budgets share cached prefixes, while a wider budget does not."""
    sparse = _backend(sparse_token_budget=96, prefill_local_tokens=112)  # span: 16 sinks + 112
    for _, got, want in _run_both([{1: 60, 2: 100}, {1: 60}], sparse, budgets={1: 96, 2: 128}):
        assert torch.equal(got, want)
    assert sparse.kv_key("sparse", 96) == sparse.kv_key("sparse", 128) != sparse.kv_key("sparse", 512)
    assert sparse.kv_key("dense", 96) == "dense"


def test_dense_mode_sequences_match_dense_inside_a_sparse_batch():
    """Sequence 2 asks for dense: it matches the dense backend (up to the batch shape's rounding: the dense
    backend sees it in a smaller batch), while sequence 1 beside it runs sparse."""
    steps = [{1: 300, 2: 300}, *[{1: 1, 2: 1}] * 3]
    for layer, got, want in _run_both(steps, _backend(), modes={2: "dense"}):
        half = got.shape[0] // 2
        torch.testing.assert_close(got[half:], want[half:], rtol=1e-6, atol=1e-6)
        assert layer < 1 or not torch.allclose(got[:half], want[:half])


def _lambda_reference(q, k, v, ctx: int, sink: int, window: int) -> torch.Tensor:
    """Dense attention of the last q.shape[0] positions with a sink + sliding window mask."""
    qpos = torch.arange(ctx - q.shape[0], ctx)[:, None]
    kpos = torch.arange(ctx)[None, :]
    mask = (kpos <= qpos) & ((kpos < sink) | (kpos > qpos - window))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)


def test_streaming_head_prefill_matches_a_masked_dense_reference():
    """All heads streaming, prefilled in chunks: each chunk equals the Lambda-masked dense reference."""
    sparse = _backend(_profile([[True, True]] * LAYERS), dense_layers=0)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    keys = {layer: [] for layer in range(LAYERS)}
    values = {layer: [] for layer in range(LAYERS)}
    for n in (150, 70, 90):
        meta = batch.meta({7: n})
        q, k, v = batch.qkv(meta)
        sparse.begin_step(meta)
        for layer in range(LAYERS):
            keys[layer].append(k)
            values[layer].append(v)
            got = sparse.forward(layer, q, k, v, meta)
            want = _lambda_reference(q, torch.cat(keys[layer]), torch.cat(values[layer]),
                                     meta.context_lens[0], sink=16, window=48)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("recent", "selection"), [(32, "kv-head"), (96, "kv-head"), (32, "query-head")])
def test_retrieval_heads_read_sink_recent_and_best_pages_within_budget(recent: int, selection: str):
    """Keys are zero but for one planted page, so attention is uniform over what is read: value channels
    marking sink, recent and planted positions reveal how many keys each kind contributes."""
    sparse = _backend(_profile([[False, False]] * LAYERS), sparse_token_budget=256, dense_layers=0,
                      retrieval_local_tokens=recent, sparse_selection=selection)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    ctx, needle = 1000, range(480, 496)
    q = torch.ones(1, HQ, D)
    k = torch.zeros(ctx, HKV, D)
    k[list(needle)] = 0.001
    v = torch.zeros(ctx, HKV, D)
    v[:16, :, 0] = 1  # sink
    v[-recent:, :, 1] = 1  # the retrieval heads' local window
    v[list(needle), :, 2] = 1
    meta = batch.meta({3: ctx - 1})
    sparse.begin_step(meta)
    sparse.forward(0, torch.zeros(ctx - 1, HQ, D), k[:-1], v[:-1], meta)
    meta = batch.meta({3: 1})
    sparse.begin_step(meta)
    out = sparse.forward(0, q, k[-1:], v[-1:], meta)[0]
    read = 16 / out[:, 0]  # every sink key is read, weights are ~uniform
    assert torch.all(read <= 256 + 1) and torch.all(read >= 256 - 32 - 1)
    torch.testing.assert_close(out[:, 1] * read, torch.full((HQ,), float(recent)), rtol=0.02, atol=0)
    torch.testing.assert_close(out[:, 2] * read, torch.full((HQ,), 16.0), rtol=0.02, atol=0)


def test_selection_is_reused_then_recomputed_and_released():
    sparse = _backend(selector_interval=3)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    meta = batch.meta({5: 400})
    sparse.begin_step(meta)
    for layer in range(LAYERS):
        sparse.forward(layer, *batch.qkv(meta), meta)
    select, selections = sparse.policy.select, []
    sparse.policy.select = lambda req: selections.append(req.layer) or select(req)
    kept = []
    for _ in range(4):
        meta = batch.meta({5: 1})
        sparse.begin_step(meta)
        for layer in range(LAYERS):
            sparse.forward(layer, *batch.qkv(meta), meta)
        kept.append(sparse.table.units[2][sparse.table.slots[5]].clone())
    assert selections == [1, 2, 1, 2]  # the first decode step and the fourth select; two reuse
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[1], kept[2])
    sparse.release(5)
    assert 5 not in sparse.table.slots


def test_telemetry_reports_recall_tokens_read_and_fallbacks():
    sparse = _backend(sparse_recall_sample=1.0, sparse_token_budget=128)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    for steps in ({1: 500, 2: 50}, {1: 1, 2: 1}, {1: 1, 2: 1}):
        meta = batch.meta(steps)
        sparse.begin_step(meta)
        for layer in range(LAYERS):
            sparse.forward(layer, *batch.qkv(meta), meta)
    stats = sparse.drain_stats()
    assert stats.dense_fallbacks == 3  # sequence 2 fits the budget at every step
    assert len(stats.recall_samples) == 2 and all(0 < r <= 1 for r in stats.recall_samples)
    assert len(stats.tokens_read) == 2
    assert all(128 < n < 501 for n in stats.tokens_read)  # a dense layer reads all, sparse ones less
    empty = sparse.drain_stats()
    assert empty.recall_samples == [] and empty.dense_fallbacks == 0


@pytest.mark.parametrize("policy", ["hierarchical", "hip"])
def test_budget_at_the_floor_reads_only_sink_and_recent_units(policy: str):
    """A per-request budget smaller than the always-kept units is raised to them; nothing is chosen."""
    sparse = _backend(_profile([[False, False]] * LAYERS), sparse_policy=policy)
    batch = Batch()
    sparse.pool, sparse.dense.pool = batch.pool, batch.pool
    for steps in ({4: 500}, {4: 1}):
        meta = batch.meta(steps, budgets={4: 16})
        sparse.begin_step(meta)
        for layer in range(LAYERS):
            assert torch.isfinite(sparse.forward(layer, *batch.qkv(meta), meta)).all()
    assert sparse.drain_stats().tokens_read[0] < (501 + 2 * 128) / 3  # one dense layer, two at <= 4 units


def test_a_reused_selection_row_holds_nothing_of_its_previous_sequence():
    """A sequence with a small budget reads only its own k chosen units, but the row's tail must not
    hold the previous holder's (a longer context's) units either: they once indexed past `allowed`."""
    from needle.attention.selection_table import SelectionTable

    table = SelectionTable(num_layers=2, heads=1, device=torch.device("cpu"))
    table.reserve(1, 6)
    row = table.slot(1)
    for units in table.units:
        units[row] = 476
    table.release(1)
    assert table.slot(2) == row
    assert all(bool((units[row] == -1).all()) for units in table.units)
