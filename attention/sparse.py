"""Sparse attention: streaming heads read sinks + a local window, retrieval heads read top-k pages.

Per layer and KV head, the head profile says streaming or retrieval. Decode, per sequence:
  * streaming heads attend to the first `sink_tokens` and the last `local_tokens` positions;
  * retrieval heads attend to the sink units, the newest units (`retrieval_local_tokens`) and the `k`
    units the policy ranks best (k fills the sequence's token budget); a selection is kept for
    `selector_interval` steps.
A verify step (a decoding sequence's newest token + its drafts, see base.py) is decode: each row reads
what a decode step at its position would, with the sequence's one kept selection. The reselection
schedule counts positions, so a verify of n rows advances it by n (rejected rows are taken back,
`rollback`), and when due its first row's query reselects. `draft_limit` bounds the drafts so that no
row would reselect, or cross from dense to sparse, where plain decoding would: then speculation in
sparse mode gives plain sparse decoding's tokens exactly.
Prefill (also chunked): streaming heads attend to sinks + the last `prefill_local_tokens` before each
query (a Lambda-shaped mask); retrieval heads attend densely, as in LServe, or with `prefill_density`
block-sparsely: each 128-token query block reads that share of its key blocks (kernels/block_prefill.py).
Dense, exactly as the dense backend computes it: the first `dense_layers` layers, sequences in "dense"
mode, sequences whose context fits their budget, and prefill chunks whose context the streaming heads'
window covers anyway (so sparse prefill is the same for every budget within that window).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from needle.attention.base import AttentionBackend, AttentionMetadata, AttentionStats
from needle.attention.cpu_decode import (
    PagedRows,
    in_place_decode,
    paged_decode,
    summarise_slots,
    summarises_in_place,
    unit_positions,
    write_kv,
)
from needle.attention.dense import DenseBackend
from needle.attention.head_profile import HeadProfile
from needle.attention.kernels.block_prefill import (
    block_sparse_prefill_torch,
    prefill_block_sparse,
    skips_blocks,
)
from needle.attention.policies import POLICIES, SelectionRequest, SparsePolicy
from needle.attention.policies.base import gather_heads, token_slots, top_p_cut, top_units
from needle.attention.selection_table import SelectionTable
from needle.kvcache.pool import KVPool
from needle.kvcache.summaries import update_summaries


@dataclass(frozen=True)
class SparseConfig:
    """The sparse backend's settings, built once from the engine arguments (EngineArgs.sparse_config)."""

    policy: str = "hierarchical"
    page_score: str = "mean"
    token_budget: int = 1024  # default per-sequence budget; requests may override it
    unit_tokens: int = 64  # selection unit of the hierarchical policy
    per_query_head: bool = False  # select per query head instead of per KV head (GQA group vote)
    selector_interval: int = 4
    dense_layers: int = 2
    sink_tokens: int = 64
    local_tokens: int = 256
    retrieval_local_tokens: int = 64
    prefill_local_tokens: int = 2048
    prefill_density: float = 0.0  # retrieval heads' prefill: share of key blocks read (0: dense)
    recall_sample: float = 0.01
    observation_window: int = 32  # seed the first selection from the prompt's last N queries (0: off)
    min_recall: float = 0.0  # fidelity guard: widen a sequence's budget when its recall falls below
    top_p: float = 0.0  # adaptive budget: stop choosing units once they hold this estimated mass (0: off)
    top_p_floor: int = 256  # tokens of chosen units kept under top_p, however concentrated the mass
    drift: float = 0.0  # also reselect when a query's cosine to its selection's query falls below (0: off)
    seed: int = 0


def allowed_units(context_lens: torch.Tensor, num_units: int, unit_tokens: int, num_sink_units: int,
                  num_recent_units: int) -> torch.Tensor:
    """[B, num_units] bool: the units a policy may choose, i.e. written, past the sink units and older
    than the always-read newest `num_recent_units` (the newest partial unit counts as one)."""
    units = torch.arange(num_units, device=context_lens.device)
    newest_allowed = (context_lens.long() - 1) // unit_tokens - num_recent_units + 1
    return (units[None, :] >= num_sink_units) & (units[None, :] < newest_allowed[:, None])


@dataclass
class _Decode:
    """Per-step layout of the sequences that decode sparsely; shared by every sparse layer."""

    index: list[int]  # positions in the step's batch
    seq_ids: list[int]  # per entry: a decode sequence, or one row of a verifying one
    rows: torch.Tensor  # [B] query row of each entry
    ctx: torch.Tensor  # [B] int64 context lengths (a verify row sees the positions up to its own)
    page_tables: torch.Tensor  # [B, P]
    stream_pos: torch.Tensor  # [B, Ns] positions read by streaming heads (clamped inside the context)
    stream_valid: torch.Tensor  # [B, Ns]
    allowed: torch.Tensor  # [B, U] units a policy may choose
    k: torch.Tensor  # [B] chosen units per selector head (from each sequence's budget)
    reselect: list[bool]  # recompute the selection this step (else reuse the kept one)
    drifts: torch.Tensor  # [B] bool: the kept selection may be replaced on query drift (not a seed)
    slots: torch.Tensor  # [B] int64 rows of the selection table
    value_tables: torch.Tensor  # [B, P] where values sit (page_tables unless they are offloaded)
    k_max: int = 0  # plan.k.max(), read once per step rather than synced per layer
    streaming: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # see stream_of
    read: torch.Tensor | None = None  # [B] keys read by the sparse layers so far, summed over heads
    within_k: torch.Tensor | None = None  # [B, k_max] bool: chosen index below the entry's k
    sink_reads: tuple[torch.Tensor, torch.Tensor] | None = None  # sink units' [B, S * unit] positions, read
    recent_reads: tuple[torch.Tensor, torch.Tensor] | None = None  # newest units' [B, R * unit] (clamped)

    def stream_of(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The streaming heads' positions and valid flags [B, heads, Ns] (contiguous, as the CPU
        kernel reads them), built once per step for each streaming-head count."""
        if heads not in self.streaming:
            b = self.stream_pos.shape[0]
            self.streaming[heads] = (self.stream_pos[:, None, :].expand(b, heads, -1).contiguous(),
                                     self.stream_valid[:, None, :].expand(b, heads, -1).contiguous())
        return self.streaming[heads]


@dataclass
class _Step:
    dense: list[int]  # batch positions attended densely (fallback or dense mode)
    prefill: list[int]  # batch positions prefilling sparsely
    decode: _Decode | None
    sample_recall: bool
    recall: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> per-layer recall
    tokens_read: dict[int, float] = field(default_factory=dict)  # seq_id -> keys read, summed over heads


class SparseBackend(AttentionBackend):
    """One instance serves all layers; per-sequence selection state is keyed by seq_id."""

    name = "sparse"

    def __init__(self, pool: KVPool, config: SparseConfig, profile: HeadProfile, num_q_heads: int,
                 num_kv_heads: int):
        if pool.kmin is None:
            raise ValueError("sparse attention needs a KV pool created with_summaries=True")
        self.pool = pool
        self.dense = DenseBackend(pool)
        self.profile = profile
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.group = num_q_heads // num_kv_heads
        self.head_dim = pool.spec.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.config = config
        self.per_query_head = config.per_query_head
        self.token_budget = config.token_budget
        self.dense_layers = config.dense_layers
        self.sink_tokens, self.local_tokens = config.sink_tokens, config.local_tokens
        self.prefill_local_tokens = config.prefill_local_tokens
        self.prefill_density = config.prefill_density
        self.selector_interval = config.selector_interval
        self.recall_sample = config.recall_sample
        self.observation_window, self.min_recall = config.observation_window, config.min_recall
        self._widened: dict[int, int] = {}  # seq_id -> budget the fidelity guard widened it to
        self._checked: set[int] = set()  # sequences whose first sparse decode step the guard measured
        heads = num_q_heads if config.per_query_head else num_kv_heads
        self.table = SelectionTable(profile.num_layers, heads, pool.device)  # the kept selections
        self._age: dict[int, tuple[int, int]] = {}  # seq_id -> (positions since selection, its budget)
        self._seeded: set[int] = set()  # sequences reading their prompt-aware seed (no drift reselection)
        self.set_adaptive(config.top_p, config.top_p_floor, config.drift)
        self.set_policy(config.policy, config.page_score, config.retrieval_local_tokens)
        self._rng = random.Random(config.seed)
        dev = pool.device
        self._streaming = [torch.tensor([h for h, s in enumerate(row) if s], dtype=torch.long, device=dev)
                           for row in profile.streaming]
        self._retrieval = [torch.tensor([h for h, s in enumerate(row) if not s], dtype=torch.long, device=dev)
                           for row in profile.streaming]
        self._step: _Step | None = None
        self._stats = AttentionStats()

    def set_policy(self, name: str, page_score: str, retrieval_local_tokens: int) -> None:
        """Switch the page-selection policy and the retrieval heads' local window (kept selections are
        dropped); the quality harness compares policies over one prefilled cache this way."""
        policy = POLICIES[name](self.config.unit_tokens, self.pool.spec.summary_tokens, page_score)
        if self.top_p > 0 and not policy.scores_units:
            raise ValueError(f"--sparse-top-p needs a policy that scores every unit (hierarchical, quest), "
                             f"not {name}")
        self.policy: SparsePolicy = policy
        self.unit = self.policy.unit_tokens
        self.num_sink_units = -(-self.sink_tokens // self.unit)
        self.num_recent_units = 1 + -(-retrieval_local_tokens // self.unit)  # + the newest partial
        self.table.clear()
        self._age.clear()
        self._seeded.clear()

    def set_adaptive(self, top_p: float, top_p_floor: int, drift: float) -> None:
        """The top-p budget and drift reselection (0: off), checked as the flags are; the quality
        harness switches them in place (set top_p before a policy that cannot estimate mass)."""
        if not 0.0 <= top_p <= 1.0 or top_p_floor < 0 or not 0.0 <= drift < 1.0:
            raise ValueError(f"top_p in [0, 1], top_p_floor >= 0, drift in [0, 1); got {top_p}, "
                             f"{top_p_floor}, {drift}")
        self.top_p, self.top_p_floor, self.drift = top_p, top_p_floor, drift
        selector_dim = self.head_dim * (1 if self.per_query_head else self.group)  # a selector head's query
        self.table.keep_anchors(selector_dim if drift > 0 else 0)

    def set_selection(self, per_query_head: bool) -> None:
        """Select per query head or per KV group (torch path; the quality harness compares both over
        one prefilled cache). Kept selections are dropped."""
        self.per_query_head = per_query_head
        heads = self.num_q_heads if per_query_head else self.num_kv_heads
        self.table = SelectionTable(self.profile.num_layers, heads, self.pool.device)
        self._age.clear()
        self.set_adaptive(self.top_p, self.top_p_floor, self.drift)  # the new table keeps anchors too

    # ---- lifecycle -------------------------------------------------------------------------------

    def release(self, seq_id: int) -> None:
        self.table.release(seq_id)
        self._age.pop(seq_id, None)
        self._widened.pop(seq_id, None)
        self._checked.discard(seq_id)
        self._seeded.discard(seq_id)

    def rollback(self, seq_id: int, rejected: int) -> None:
        if seq_id in self._age and rejected:
            age, budget = self._age[seq_id]
            self._age[seq_id] = (age - rejected, budget)

    def draft_limit(self, seq_id: int, budget: int, context: int) -> int | None:
        """At context `context` (before the step), the drafts a sparse-mode sequence may verify: all its
        rows on one side of the dense/sparse boundary, none at a position where plain decoding reselects."""
        budget = self._whole_units(budget or self.token_budget)
        if context <= budget:
            return budget - context
        age, kept = self._age.get(seq_id, (self.selector_interval, budget))
        fresh = age >= self.selector_interval or kept != budget
        return self.selector_interval - 1 - (0 if fresh else age)

    def budget_of(self, meta: AttentionMetadata, i: int) -> int:
        """The sequence's token budget, rounded down to whole units (never below the always-kept ones);
        the fidelity guard may have widened it."""
        budget = meta.token_budgets[i] if meta.token_budgets and meta.token_budgets[i] else self.token_budget
        return self._whole_units(max(budget, self._widened.get(meta.seq_ids[i], 0)))

    def _whole_units(self, budget: int) -> int:
        floor = (self.num_sink_units + self.num_recent_units) * self.unit
        return max(floor, budget // self.unit * self.unit)

    def dense_prefill_span(self, budget: int) -> int:
        """Longest context a prefill chunk attends densely: the budget, or the streaming heads' window
        (sinks + prefill_local_tokens) when wider, as a window covering the whole context is dense."""
        return max(self._whole_units(budget), self.sink_tokens + self.prefill_local_tokens)

    def kv_key(self, mode: str, budget: int) -> str:
        """Sparse-prefilled KV depends on the budget only through the dense prefill span, so budgets
        within the prefill window share cached prefixes (the quality harness relies on it)."""
        return mode if mode == "dense" else f"{mode}:{self.dense_prefill_span(budget)}"

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._flush_step_stats()
        dense, prefill, decode = [], [], []
        for i in range(meta.num_seqs):
            sparse_mode = not meta.modes or meta.modes[i] != "dense"
            budget = self.budget_of(meta, i)
            decoding = meta.query_lens[i] == 1 or meta.is_verify(i)
            span = budget if decoding else self.dense_prefill_span(budget)
            if not sparse_mode or meta.context_lens[i] <= span:
                dense.append(i)
                if sparse_mode:
                    self._stats.dense_fallbacks += 1
            elif decoding:
                decode.append(i)
            else:
                prefill.append(i)
        sample = bool(decode) and (self._rng.random() < self.recall_sample or self._guard_due(meta, decode))
        self._step = _Step(dense, prefill, self._plan_decode(meta, decode) if decode else None, sample)

    def _guard_due(self, meta: AttentionMetadata, decode: list[int]) -> bool:
        """With the fidelity guard on, every sequence's first sparse decode step measures recall."""
        if self.min_recall <= 0:
            return False
        new = {meta.seq_ids[i] for i in decode} - self._checked
        self._checked |= new
        return bool(new)

    def _plan_decode(self, meta: AttentionMetadata, index: list[int]) -> _Decode:
        dev = self.pool.device
        starts = meta.query_start_loc.tolist()
        # One entry per query row: a verifying sequence's rows decode at consecutive positions.
        entries = [(i, j) for i in index for j in range(meta.query_lens[i])]
        ctx = torch.tensor([meta.context_lens[i] - meta.query_lens[i] + 1 + j for i, j in entries],
                           dtype=torch.long, device=dev)
        sink = torch.arange(self.sink_tokens, device=dev).expand(len(entries), -1)
        local = ctx[:, None] - self.local_tokens + torch.arange(self.local_tokens, device=dev)
        stream_pos = torch.cat([sink, local], dim=1)
        stream_valid = torch.cat([sink < ctx[:, None], local >= max(self.sink_tokens, 0)], dim=1)
        last = (ctx - 1) // self.unit
        recent = last[:, None] - torch.arange(self.num_recent_units, device=dev)
        allowed = allowed_units(ctx, int(last.max()) + 1, self.unit, self.num_sink_units,
                                self.num_recent_units)
        budgets = [self.budget_of(meta, i) for i in index]
        budget_of = dict(zip(index, budgets, strict=True))
        fixed = self.num_sink_units + self.num_recent_units
        k = torch.tensor([budget_of[i] // self.unit - fixed for i, _ in entries], dtype=torch.long,
                         device=dev)
        seq_ids = [meta.seq_ids[i] for i in index]
        self.table.reserve(0, max(budgets) // self.unit)
        slots = torch.tensor([self.table.slot(meta.seq_ids[i]) for i, _ in entries], dtype=torch.long,
                             device=dev)
        fresh = dict(zip(index, self.due(seq_ids, budgets, [meta.query_lens[i] for i in index]), strict=True))
        rows_of_entries = [i for i, _ in entries]
        page_tables = meta.page_tables[rows_of_entries]
        offsets = torch.arange(self.unit, device=dev)

        def unit_reads(units: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Positions of units [B, n] (clamped into the context) and which are read [B, n * unit]."""
            pos = (units[..., None] * self.unit + offsets).flatten(1)
            read = ok[..., None].expand(-1, -1, self.unit).flatten(1) & (pos < ctx[:, None])
            return pos.minimum(ctx[:, None] - 1), read

        sink_units = torch.arange(self.num_sink_units, device=dev).expand(len(entries), -1)
        k_max = max(budget_of[i] // self.unit - fixed for i, _ in entries)
        return _Decode(
            index=index, seq_ids=[meta.seq_ids[i] for i, _ in entries],
            rows=torch.tensor([starts[i] + j for i, j in entries], dtype=torch.long, device=dev), ctx=ctx,
            page_tables=page_tables,
            stream_pos=stream_pos.clamp(min=0).minimum(ctx[:, None] - 1),
            stream_valid=stream_valid, allowed=allowed, k=k,
            reselect=[fresh[i] and j == 0 for i, j in entries],
            drifts=torch.tensor([meta.seq_ids[i] not in self._seeded for i, _ in entries], device=dev),
            slots=slots,
            value_tables=page_tables if meta.value_tables is None else meta.value_tables[rows_of_entries],
            k_max=k_max, read=torch.zeros(len(entries), dtype=torch.long, device=dev),
            within_k=torch.arange(k_max, device=dev) < k[:, None],
            sink_reads=unit_reads(sink_units, torch.ones_like(sink_units, dtype=torch.bool)),
            recent_reads=unit_reads(recent.clamp(min=0), recent >= self.num_sink_units))

    def due(self, seq_ids: list[int], budgets: list[int], rows: list[int]) -> list[bool]:
        """Which sequences reselect this decode step: every `selector_interval` positions of their own,
        and whenever their budget changes. Advances each sequence's count by its query rows (both
        backends' one schedule)."""
        fresh = []
        for seq_id, budget, n in zip(seq_ids, budgets, rows, strict=True):
            age, kept_budget = self._age.get(seq_id, (self.selector_interval, budget))
            fresh.append(age >= self.selector_interval or kept_budget != budget)
            self._age[seq_id] = (n if fresh[-1] else age + n, budget)
            if fresh[-1]:
                self._seeded.discard(seq_id)
        return fresh

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("begin_step() must run before forward()")
        if window is not None or layer < self.dense_layers or len(step.dense) == meta.num_seqs:
            # a sliding-window layer is one streaming head over its window (no sinks, no page selection)
            out = self.dense.forward(layer, q, k, v, meta, window)
            self._summarise(layer, meta.slot_mapping)
            if window is not None:
                self._count_window_reads(layer, step, window)
            return out
        write_kv(self.pool, layer, k, v, meta.slot_mapping, meta.values_of(layer)[1])
        self._summarise(layer, meta.slot_mapping)
        out = torch.empty_like(q)
        if step.dense:
            rows = meta.rows_of(step.dense)
            out[rows] = self.dense.attend(layer, q[rows], meta.subset(step.dense))
        for i in step.prefill:
            rows = slice(int(meta.query_start_loc[i]), int(meta.query_start_loc[i + 1]))
            out[rows] = self._prefill(layer, q[rows], meta, i)
        if step.decode is not None:
            out[step.decode.rows] = self._decode(layer, q[step.decode.rows], step.decode, step)
        return out

    def _summarise(self, layer: int, slot_mapping: torch.Tensor) -> None:
        """Refresh the key summaries the step's writes touched: in one C++ call on the CPU (torch's
        recomputation costs a dozen small ops per layer, as much as a sparse layer's attention)."""
        pool = self.pool
        if summarises_in_place(pool.k[layer], pool.kmin[layer]):
            summaries = (pool.kmin[layer], pool.kmax[layer], pool.kmean[layer])
            summarise_slots(pool.k[layer], summaries, slot_mapping, pool.spec.summary_tokens)
        else:
            update_summaries(pool, layer, slot_mapping)

    def _count_window_reads(self, layer: int, step: _Step, window: int) -> None:
        """Keys read by a windowed layer at decode, for sparse_tokens_read (which otherwise counts a
        dense layer as reading the whole context and a sparse layer as what _decode reads)."""
        if step.decode is None:
            return
        for sid, ctx in zip(step.decode.seq_ids, step.decode.ctx.tolist(), strict=True):
            read = min(ctx, window) - (ctx if layer < self.dense_layers else 0)
            step.tokens_read[sid] = step.tokens_read.get(sid, 0.0) + read * self.num_q_heads

    # ---- decode ----------------------------------------------------------------------------------

    def _decode(self, layer: int, q: torch.Tensor, plan: _Decode, step: _Step) -> torch.Tensor:
        b = q.shape[0]
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        out = torch.empty_like(qg)
        lse = torch.empty(b, self.num_kv_heads, self.group, dtype=q.dtype, device=q.device)
        read = plan.read
        streaming, retrieval = self._streaming[layer], self._retrieval[layer]
        if streaming.numel():
            pos, valid = plan.stream_of(streaming.numel())
            o, s = self._attend(layer, qg[:, streaming], pos, valid, streaming, plan.page_tables,
                                plan.value_tables)
            out[:, streaming], lse[:, streaming] = o, s
            read += valid.sum(dim=(1, 2)) * self.group
        if retrieval.numel():
            kv_heads = retrieval.repeat_interleave(self.group) if self.per_query_head else retrieval
            qr = qg[:, retrieval].reshape(b, kv_heads.numel(), -1, self.head_dim)
            pos, valid = self._retrieval_positions(layer, qr, kv_heads, plan)
            values = self._retrieval_values(layer, pos, valid, plan)
            o, s = self._attend(layer, qr, pos, valid, kv_heads, plan.page_tables, values)
            out[:, retrieval] = o.view(b, retrieval.numel(), self.group, self.head_dim)
            lse[:, retrieval] = s.view(b, retrieval.numel(), self.group)
            read += valid.sum(dim=(1, 2)) * (qr.shape[2])
        if step.sample_recall:
            full = self._full_lse(layer, qg, plan)
            for sid, r in zip(plan.seq_ids, torch.exp(lse - full).mean(dim=(1, 2)).tolist(), strict=True):
                step.recall.setdefault(sid, []).append(r)
        return out.view(b, self.num_q_heads, self.head_dim)

    def _retrieval_positions(self, layer: int, q: torch.Tensor, kv_heads: torch.Tensor,
                             plan: _Decode) -> tuple[torch.Tensor, torch.Tensor]:
        """Token positions [B, H, N] of the sink, chosen and recent units, and which of them are read."""
        chosen = self._chosen_units(layer, q, kv_heads, plan)
        build = unit_positions if in_place_decode(self.pool.k) else unit_positions_torch
        return build(chosen, plan.allowed, plan.within_k, plan.ctx, self.unit, plan.sink_reads,
                     plan.recent_reads)

    def _chosen_units(self, layer: int, q: torch.Tensor, kv_heads: torch.Tensor,
                      plan: _Decode) -> torch.Tensor:
        """[B, H, max k] policy-chosen units: recomputed for sequences due, reused for the others."""
        k = plan.k_max
        if k == 0:  # the budget holds only the sink and recent units
            return torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.long, device=q.device)
        table = self.table.units[layer]
        rows = kv_heads  # the table keeps a row per KV head, or per query head when they select alone
        if self.per_query_head:
            rows = kv_heads * self.group + torch.arange(kv_heads.numel(), device=q.device) % self.group
        due = [j for j, fresh in enumerate(plan.reselect) if fresh]
        heads_due = None  # [B, H] with drift reselection: which selector heads reselect
        if self.drift > 0:
            interval_due = torch.tensor(plan.reselect, device=q.device)[:, None]
            heads_due = self._drifted(layer, q, rows, plan) | interval_due
            self._stats.drift_reselections += int(heads_due.any(dim=1).sum()) - len(due)
            due = heads_due.any(dim=1).nonzero().flatten().tolist()
        if due:
            idx = torch.tensor(due, dtype=torch.long, device=q.device)
            req = SelectionRequest(self.pool, layer, q[idx], kv_heads, plan.page_tables[idx], plan.ctx[idx],
                                   plan.allowed[idx], k)
            beyond = torch.arange(k, device=q.device) >= plan.k[idx][:, None, None]  # past each one's k
            units = self._select(req).masked_fill(beyond, -1).to(table.dtype)
            where = (plan.slots[idx][:, None], rows[None, :])
            if heads_due is not None:  # the heads that did not drift keep their selection and anchor
                keep = ~heads_due[idx][..., None]
                units = torch.where(keep, table[where][..., :k], units)
                anchors = self.table.anchors[layer]
                anchors[where] = torch.where(keep, anchors[where], q[idx].flatten(2).float())
            table[where[0], where[1], :k] = units
        return table[plan.slots[:, None], rows[None, :], :k].long()

    def _select(self, req: SelectionRequest) -> torch.Tensor:
        """The policy's k best units, cut to the top-p share of their estimated mass when top_p is on."""
        if self.top_p <= 0:
            return self.policy.select(req)
        scores = self.policy.unit_scores(req)
        return top_p_cut(top_units(scores, req.allowed, req.k), scores * self.scale, req.allowed, self.top_p,
                         self._floor_units)

    @property
    def _floor_units(self) -> int:
        return -(-self.top_p_floor // self.unit)

    def _drifted(self, layer: int, q: torch.Tensor, rows: torch.Tensor, plan: _Decode) -> torch.Tensor:
        """[B, H] selector heads whose query q [B, H, G, D] turned away from the one their selection was
        made with (cosine below `drift`); a seeded selection never drifts."""
        anchors = self.table.anchors[layer][plan.slots[:, None], rows[None, :]]  # [B, H, G * D]
        similarity = F.cosine_similarity(q.flatten(2).float(), anchors, dim=-1)
        return (similarity < self.drift) & plan.drifts[:, None]

    def _retrieval_values(self, layer: int, pos: torch.Tensor, valid: torch.Tensor,
                          plan: _Decode) -> torch.Tensor:
        """The tables [B, P] through which retrieval heads read the values at pos [B, H, N] (valid)."""
        return plan.value_tables

    def _attend(self, layer: int, q: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                kv_heads: torch.Tensor, tables: torch.Tensor,
                value_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, G, D] over the keys at pos [B, H, N] (valid [B, H, N]) of kv_heads [H], values read
        through value_tables -> output [B, H, G, D] and the log-sum-exp of the scores [B, H, G]."""
        if self.dense.reads_in_place(q.shape[2]):  # the CPU kernel reads the positions where they lie
            out, lse = paged_decode(q, self.pool.k[layer], self.pool.v[layer],
                                    PagedRows.sparse(tables, value_tables, pos, valid), self.scale, kv_heads)
            return out, lse.to(q.dtype)
        ps = self.pool.spec.page_size
        slots = token_slots(tables, pos, ps)
        keys = gather_heads(self.pool.k[layer], slots, kv_heads, q.dtype)
        value_slots = slots if value_tables is tables else token_slots(value_tables, pos, ps)
        values = gather_heads(self.pool.v[layer], value_slots, kv_heads, q.dtype)
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        lse = scores.logsumexp(dim=-1)
        return torch.exp(scores - lse[..., None]) @ values, lse

    def _full_lse(self, layer: int, q: torch.Tensor, plan: _Decode) -> torch.Tensor:
        """Log-sum-exp of every head's scores over the whole context: the dense reference for recall."""
        b = q.shape[0]
        pos = torch.arange(int(plan.ctx.max()), device=q.device).expand(b, -1)
        slots = token_slots(plan.page_tables, pos.minimum(plan.ctx[:, None] - 1), self.pool.spec.page_size)
        keys = self._rows(self.pool.k[layer], slots, q.dtype)  # [B, L, Hkv, D]
        scores = (q @ keys.permute(0, 2, 3, 1)) * self.scale  # [B, Hkv, G, L]
        scores = scores.masked_fill(~(pos < plan.ctx[:, None])[:, None, None, :], float("-inf"))
        return scores.logsumexp(dim=-1)

    # ---- prefill ---------------------------------------------------------------------------------

    def _prefill(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, i: int) -> torch.Tensor:
        """One sequence's chunk: retrieval heads causal over the whole context, streaming heads over
        sinks + the prefill window (only those keys are gathered)."""
        ctx, n = meta.context_lens[i], q.shape[0]
        dev = q.device
        qpos = torch.arange(ctx - n, ctx, device=dev)
        out = torch.empty_like(q).view(n, self.num_kv_heads, self.group, self.head_dim)
        qg = q.view(n, self.num_kv_heads, self.group, self.head_dim)
        value_tables = meta.values_of(layer)[0]
        offloaded = value_tables is not meta.page_tables
        table, value_table = meta.page_tables[i: i + 1], value_tables[i: i + 1]
        kinds = ((self._retrieval[layer], None), (self._streaming[layer], self.prefill_local_tokens))
        for heads, window in kinds:
            if not heads.numel():
                continue
            if window is None:
                kpos = torch.arange(ctx, device=dev)
            else:
                first_local = max(self.sink_tokens, ctx - n - window + 1)
                kpos = torch.cat([torch.arange(min(self.sink_tokens, ctx), device=dev),
                                  torch.arange(first_local, ctx, device=dev)])
            ps = self.pool.spec.page_size
            slots = token_slots(table, kpos[None], ps)[0]
            value_slots = token_slots(value_table, kpos[None], ps)[0] if offloaded else slots
            keys = self._rows(self.pool.k[layer], slots, q.dtype)[:, heads]
            values = self._rows(self.pool.v[layer], value_slots, q.dtype)[:, heads]
            if window is None:
                self.seed_selection(layer, qg[:, heads], keys, meta, i)
                if skips_blocks(ctx, self.prefill_density):
                    out[:, heads] = prefill_block_sparse(qg[:, heads], keys, values, self.scale,
                                                         self.prefill_density, block_sparse_prefill_torch)
                    continue
            mask = kpos[None, :] <= qpos[:, None]
            if window is not None:
                mask &= (kpos[None, :] < self.sink_tokens) | (kpos[None, :] > qpos[:, None] - window)
            out[:, heads] = _masked_sdpa(qg[:, heads], keys, values, mask)
        return out.view(n, self.num_q_heads, self.head_dim)

    def seed_selection(self, layer: int, q: torch.Tensor, keys: torch.Tensor, meta: AttentionMetadata,
                       i: int) -> None:
        """Prompt-aware selection (SnapKV's observation window): the last `observation_window` queries
        of a prefill chunk (the question, at the prompt's end) attend exactly over the whole context;
        the units holding most of that attention mass become the retrieval heads' selection for the
        first `selector_interval` decode steps, after which the query-driven reselection takes over.
        q [n, Hr, G, D] retrieval heads' queries of the chunk, keys [ctx, Hr, D]. Each chunk overwrites
        the seed, so the prompt's last chunk is the one that counts."""
        if self.observation_window <= 0 or not self.policy.query_aware:
            return
        ctx, budget, seq_id = meta.context_lens[i], self.budget_of(meta, i), meta.seq_ids[i]
        k = budget // self.unit - self.num_sink_units - self.num_recent_units
        if k <= 0:
            return
        mass = window_mass(q[-self.observation_window:], keys, ctx, self.unit, self.scale)  # [Hr, G, U]
        mass = mass.flatten(0, 1) if self.per_query_head else mass.sum(dim=1)
        # The first decode step sees one more token: its context decides the eligible units.
        allowed = allowed_units(torch.tensor([ctx + 1], device=q.device), mass.shape[-1], self.unit,
                                self.num_sink_units, self.num_recent_units)
        units = top_units(mass[None], allowed, k)
        if self.top_p > 0:
            units = top_p_cut(units, mass[None].log(), allowed, self.top_p, self._floor_units)
        units = units[0]
        retrieval = self._retrieval[layer]
        rows = retrieval
        if self.per_query_head:
            rows = (retrieval[:, None] * self.group + torch.arange(self.group, device=q.device)).flatten()
        self.table.reserve(0, budget // self.unit)
        slot = self.table.slot(seq_id)
        self.table.units[layer][slot, rows] = -1
        self.table.units[layer][slot, rows, :k] = units.to(torch.int32)
        self._age[seq_id] = (0, budget)  # due() keeps the seed for selector_interval steps
        self._seeded.add(seq_id)

    def _rows(self, cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """All KV heads of the tokens in `slots` of one layer's cache -> [*slots.shape, Hkv, D]."""
        return cache.view(-1, self.num_kv_heads, self.head_dim)[slots].to(dtype)

    # ---- telemetry -------------------------------------------------------------------------------

    def _flush_step_stats(self) -> None:
        step, self._step = self._step, None
        if step is None or step.decode is None:
            return
        per_layer = (self.dense_layers * self.num_q_heads, self.num_layers_sparse * self.num_q_heads)
        for sid, n in zip(step.decode.seq_ids, step.decode.read.tolist(), strict=True):
            step.tokens_read[sid] = step.tokens_read.get(sid, 0.0) + n
        for sid, ctx in zip(step.decode.seq_ids, step.decode.ctx.tolist(), strict=True):
            total = ctx * per_layer[0] + step.tokens_read.get(sid, 0.0)
            self._stats.tokens_read.append(round(total / (per_layer[0] + per_layer[1])))
        for sid, per_layer_recall in step.recall.items():
            recall = sum(per_layer_recall) / len(per_layer_recall)
            self._stats.recall_samples.append(recall)
            if recall < self.min_recall:
                self._widen(sid)

    def _widen(self, seq_id: int) -> None:
        """The fidelity guard: double the sequence's budget for the rest of its decode (once it covers
        the context, the sequence runs dense, as any sequence fitting its budget does)."""
        self._widened[seq_id] = 2 * self._age.get(seq_id, (0, self.token_budget))[1]
        self._stats.guard_widenings += 1

    @property
    def num_layers_sparse(self) -> int:
        return self.profile.num_layers - self.dense_layers

    def drain_stats(self) -> AttentionStats:
        """The telemetry gathered since the last drain.

        tokens_read: per decoding sequence and step, keys read per (layer, query head), averaged.
        recall_samples: per sampled step and sequence, the dense attention mass the read keys hold,
        averaged over sparse layers and heads. dense_fallbacks: sequences run dense in sparse mode.
        """
        self._flush_step_stats()
        stats, self._stats = self._stats, AttentionStats()
        return stats


def unit_positions_torch(chosen: torch.Tensor, allowed: torch.Tensor, within_k: torch.Tensor,
                         ctx: torch.Tensor, unit: int, sink: tuple[torch.Tensor, torch.Tensor],
                         recent: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """cpu_decode.unit_positions in torch (the GPU-less fallback and the reference): chosen [B, H, K]
    units -> positions [B, H, N] of the sink, chosen and recent units, and which of them are read."""
    b, h = chosen.shape[:2]
    width = allowed.shape[1]
    inside = chosen.clamp(0, width - 1)
    chosen_ok = (chosen >= 0) & (chosen < width) & allowed.gather(1, inside.view(b, -1)).view_as(chosen)
    chosen_ok &= within_k[:, None, :]
    ctx = ctx[:, None, None]
    pos = (chosen.clamp(min=0)[..., None] * unit + torch.arange(unit, device=chosen.device)).flatten(2)
    valid = chosen_ok[..., None].expand(-1, -1, -1, unit).flatten(2) & (pos < ctx)
    (sink_pos, sink_ok), (recent_pos, recent_ok) = sink, recent

    def around(first: torch.Tensor, middle: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return torch.cat([first[:, None].expand(b, h, -1), middle, last[:, None].expand(b, h, -1)], -1)

    return around(sink_pos, pos.minimum(ctx - 1), recent_pos), around(sink_ok, valid, recent_ok)


def window_mass(q: torch.Tensor, keys: torch.Tensor, ctx: int, unit: int, scale: float) -> torch.Tensor:
    """Attention mass of the prompt's last queries over each unit of `unit` tokens, summed over the
    queries: q [w, H, G, D] at positions ctx - w .. ctx - 1 (causal), keys [ctx, H, D]
    -> [H, G, ceil((ctx + 1) / unit)] (the last unit may still be partial, as at the first decode step)."""
    w = q.shape[0]
    scores = torch.einsum("whgd,lhd->hgwl", q.float(), keys.float()) * scale
    qpos = torch.arange(ctx - w, ctx, device=q.device)
    causal = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).sum(dim=2)  # [H, G, ctx]
    num_units = -(-(ctx + 1) // unit)
    return F.pad(probs, (0, num_units * unit - ctx)).view(*probs.shape[:2], num_units, unit).sum(dim=-1)


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [T, H, G, D], k/v [L, H, D], mask [T, L] -> [T, H, G, D]."""
    g = q.shape[2]
    k = k.transpose(0, 1)[:, None].expand(-1, g, -1, -1)
    v = v.transpose(0, 1)[:, None].expand(-1, g, -1, -1)
    return F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k, v, attn_mask=mask).permute(2, 0, 1, 3)
