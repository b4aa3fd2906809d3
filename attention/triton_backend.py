"""CUDA attention backends on the Triton kernels (attention/kernels/): the same results as dense.py and
sparse.py, which stay the CPU path and the reference.

`build_backend` (attention/__init__.py) picks these classes on CUDA for --attention-backend triton.

Decode steps, and the verify steps of speculative decoding (a sequence's newest token + its drafts, in
the same decode kernels), are CUDA-graph safe (engine/cuda_graph.py): every op reads only device tensors
whose shapes depend on the batch size, the query length and the page-table width, and `graph_key` names
the graph a step needs.

Sparse decode keeps sparse.py's semantics exactly (streaming heads: sinks + local window; retrieval
heads: sink units + newest units + the policy's top-k units, chosen per KV head or per query head, each
sequence reselecting on its own schedule), reading and writing the same SelectionTable as the torch
path, so a sequence keeps its selection whichever path runs its step (tests/test_gpu_parity.py checks
the tokens); a step of dense-mode sequences only runs the dense kernels. Steps the fast path does not
cover (prefill chunks mixed with decodes, dense and sparse sequences mixed, contexts within the budget,
the hip policy) run through SparseBackend's torch code, except prefill attention itself, which runs on
flash attention here.
"""

from __future__ import annotations

import math

import torch

from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.attention.head_profile import HeadProfile
from needle.attention.kernels.block_prefill import block_sparse_prefill, prefill_block_sparse, skips_blocks
from needle.attention.kernels.kv_append import kv_append
from needle.attention.kernels.page_select import Choosable, select_units
from needle.attention.kernels.paged_decode import paged_decode, sparse_decode
from needle.attention.kernels.prefill import gather_context, prefill_dense, prefill_streaming
from needle.attention.sparse import SparseBackend, SparseConfig, _Step
from needle.kvcache.pool import KVPool, to_page_dtype


def append(pool: KVPool, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write the step's K/V (values at their value slots where offload moved them) and keep the key
    summaries exact (when the pool has them)."""
    summaries = None if pool.kmin is None else (pool.kmin[layer], pool.kmax[layer], pool.kmean[layer])
    value_slots = meta.values_of(layer)[1]
    kv_append(pool.k[layer], pool.v[layer], summaries, k, v, meta.slot_mapping, pool.spec.summary_tokens,
              None if value_slots is meta.slot_mapping else value_slots)


def _block_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  blocks: torch.Tensor) -> torch.Tensor:
    """prefill_block_sparse's attend on the Triton kernel (q [n, Hkv, G, D])."""
    return block_sparse_prefill(q.flatten(1, 2), k, v, scale, blocks).view(q.shape)


def _dense_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """prefill_block_sparse's dense rows on flash / cuDNN (q [n, Hkv, G, D])."""
    return prefill_dense(q.flatten(1, 2), k, v, scale).view(q.shape)


def value_tables_of(meta: AttentionMetadata, layer: int) -> torch.Tensor | None:
    """The tables the kernels read `layer`'s values through, or None: at the pages' own slots."""
    tables = meta.values_of(layer)[0]
    return None if tables is meta.page_tables else tables


class TritonDenseBackend(DenseBackend):
    name = "triton-dense"

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        append(self.pool, layer, k, v, meta)
        if meta.decodes_only:
            return self._decode(layer, q, meta, window)
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        dec = [i for i in range(meta.num_seqs) if meta.decodes(i)]
        if dec:
            rows = meta.rows_of(dec)
            out[rows] = self._decode(layer, q[rows], meta.subset(dec), window)
        for i, n in enumerate(meta.query_lens):
            if not meta.decodes(i):
                rows = slice(starts[i], starts[i] + n)
                out[rows] = self.prefill(layer, q[rows], k[rows], v[rows], meta.page_tables[i],
                                         meta.context_lens[i], window, meta.values_of(layer)[0][i])
        return out

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
                window: int | None) -> torch.Tensor:
        """Decodes and verifies (several queries per sequence, in the same kernel)."""
        return paged_decode(q, self.pool.k[layer], self.pool.v[layer], meta.page_tables, meta.context_lens_t,
                            1.0 / math.sqrt(q.shape[-1]), window=window,
                            value_tables=value_tables_of(meta, layer), **meta.decode_kernel_args())

    def prefill(self, layer: int, q, k, v, page_table: torch.Tensor, ctx: int,
                window: int | None = None, value_table: torch.Tensor | None = None) -> torch.Tensor:
        """A prefill chunk: causal over the context in the pages (a later chunk) or its own keys; a
        sliding-window layer gathers only the keys its oldest query can see."""
        n, scale = q.shape[0], 1.0 / math.sqrt(q.shape[-1])
        first = 0 if window is None else max(0, ctx - n - window + 1)
        if ctx > n:
            k = gather_context(self.pool.k[layer], page_table, ctx)[first:].to(q.dtype)
            v = gather_context(self.pool.v[layer], page_table if value_table is None else value_table,
                               ctx)[first:].to(q.dtype)
        elif self.pool.k.dtype != k.dtype:  # fp8 pages: attend to what the cache holds, as later steps do
            k, v = (to_page_dtype(t, self.pool.k.dtype).to(q.dtype) for t in (k, v))
        if window is None:
            return prefill_dense(q, k, v, scale)
        return prefill_streaming(q, k, v, scale, sink=0, local=window)

    def graph_key(self, meta: AttentionMetadata):
        return "decode" if meta.uniform_query_len else None


class TritonSparseBackend(SparseBackend):
    name = "triton-sparse"

    def __init__(self, pool: KVPool, config: SparseConfig, profile: HeadProfile, num_q_heads: int,
                 num_kv_heads: int):
        super().__init__(pool, config, profile, num_q_heads, num_kv_heads)
        self.dense = TritonDenseBackend(self.pool)
        dev = self.pool.device
        self._stream_flags = [torch.tensor(row, dtype=torch.int32, device=dev)
                              for row in self.profile.streaming]
        # The fast path's plan: (which rows reselect: none|all|some, k), or ("dense", 0) when every sequence
        # is in dense mode; None: the torch path runs the step.
        self._fast: tuple[str, int] | None = None
        # Per batch row, static as graphs read them: its selection-table slot, whether it reselects, and
        # per layer its selection. While one batch runs the fast path, _sel holds its rows and the table
        # is behind; `_flush` writes them back before anything else reads the table.
        self._slots = torch.zeros(0, dtype=torch.long, device=dev)
        self._fresh = torch.zeros(0, dtype=torch.bool, device=dev)
        self._sel: list[torch.Tensor] = []
        self._synced: list[int] | None = None  # the seq_ids whose selections _sel holds
        self._version = 0  # bumped when these buffers or the table move (captured graphs hold them)

    def reserve(self, max_batch: int) -> None:
        self.table.reserve(max_batch, self.token_budget // self.unit)
        self._reserve_rows(max_batch)

    def _reserve_rows(self, batch: int) -> None:
        rows, width = max(batch, self._slots.numel()), self.table.width
        if rows == self._slots.numel() and self._sel and self._sel[0].shape[2] == width:
            return
        self._flush()
        dev = self.pool.device
        self._slots = torch.zeros(rows, dtype=torch.long, device=dev)
        self._fresh = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._sel = [torch.full((rows, self.table.heads, width), -1, dtype=torch.int32, device=dev)
                     for _ in range(self.profile.num_layers)]
        self._version += 1

    def _flush(self) -> None:
        """Write the fast path's selections back into the table (once per batch change, not per step)."""
        if self._synced:
            n = len(self._synced)
            for sel, units in zip(self._sel, self.table.units, strict=True):
                units[self._slots[:n], :, :sel.shape[2]] = sel[:n]
        self._synced = None

    def set_policy(self, name: str, page_score: str, retrieval_local_tokens: int) -> None:
        super().set_policy(name, page_score, retrieval_local_tokens)
        self._synced = None  # the kept selections are void

    def set_adaptive(self, top_p: float, top_p_floor: int, drift: float) -> None:
        """The selection kernel fills a fixed k on one schedule per sequence: no top-p, no drift."""
        if top_p > 0 or drift > 0:
            raise ValueError("--sparse-top-p and --sparse-drift run on the torch attention backend only "
                             "(--attention-backend torch); the Triton selection kernel keeps a fixed k "
                             "and one reselection schedule per sequence")
        super().set_adaptive(top_p, top_p_floor, drift)

    def _fast_plan(self, meta: AttentionMetadata) -> tuple[str, int] | None:
        """The Triton decode path takes steps of decodes and verifies only, one budget, every context past
        it; it reselects on the torch path's schedule (SparseBackend.due) into the same selection table,
        a verifying sequence with its oldest query (at the position a plain decode would have been)."""
        if not meta.decodes_only:
            return None
        if meta.modes and all(m == "dense" for m in meta.modes):
            return "dense", 0  # e.g. verifying self_sparse drafts densely: the dense kernels, graphed
        if self.policy.name not in ("hierarchical", "quest") or any(m == "dense" for m in meta.modes):
            return None
        if self.min_recall > 0 and set(meta.seq_ids) - self._checked:
            return None  # the guard measures a sequence's first sparse decode step (torch path)
        budgets = {self.budget_of(meta, i) for i in range(meta.num_seqs)}
        if len(budgets) != 1 or min(meta.context_lens) <= next(iter(budgets)):
            return None
        budget = next(iter(budgets))
        if self._synced != meta.seq_ids:
            self._flush()
        self.table.reserve(meta.num_seqs, budget // self.unit)
        slots = [self.table.slot(s) for s in meta.seq_ids]
        self._reserve_rows(meta.num_seqs)  # after the table: its width may have grown
        fresh = self.due(meta.seq_ids, [budget] * meta.num_seqs, meta.query_lens)
        b = meta.num_seqs
        # Host -> device copies from pinned memory, asynchronous: the host never waits for the GPU here.
        if self._synced != meta.seq_ids:  # another batch, or the torch path ran: copy the rows in
            self._slots[:b].copy_(torch.tensor(slots).pin_memory(), non_blocking=True)
            self._slots[b:].fill_(self.table.scratch)  # rows a graph pads the batch with
            for sel, units in zip(self._sel, self.table.units, strict=True):
                sel[:b].copy_(units[self._slots[:b]])
            self._synced = list(meta.seq_ids)
        which = "all" if all(fresh) else "some" if any(fresh) else "none"
        if which == "some":
            self._fresh[:b].copy_(torch.tensor(fresh).pin_memory(), non_blocking=True)
            self._fresh[b:].fill_(False)
        return which, budget // self.unit - self.num_sink_units - self.num_recent_units

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._fast = self._fast_plan(meta)
        if self._fast is None:
            self._flush()  # the torch path reads and writes the table
            super().begin_step(meta)
            return
        self._flush_step_stats()
        self._step = _Step([], [], None, False)

    def graph_key(self, meta: AttentionMetadata):
        if self._fast is None or meta.uniform_query_len is None:
            return None
        return ("sparse", *self._fast, self.table.version, self._version)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        if self._fast is None:
            return super().forward(layer, q, k, v, meta, window)
        reselect, kk = self._fast
        if layer < self.dense_layers or reselect == "dense" or window is not None:
            # (a sliding-window layer is one streaming head over its window, as in sparse.py)
            return self.dense.forward(layer, q, k, v, meta, window)  # its append keeps the summaries exact
        pool = self.pool
        append(pool, layer, k, v, meta)
        sel = self._sel[layer][:meta.num_seqs, :, :kk]
        if reselect != "none" and kk > 0:  # kk = 0: the budget holds only the sink and recent units
            qs, ctx = q, meta.context_lens_t
            if not meta.is_decode:  # a verify selects with its oldest query, at that query's context
                starts = meta.query_start_loc
                qs = q[starts[:-1]]
                ctx = (ctx - (starts[1:] - starts[:-1]) + 1).clamp(min=0).to(ctx.dtype)
            allowed = Choosable(ctx, self.unit, self.num_sink_units, self.num_recent_units)
            # q . kmean is the bound kernel fed the mean as both min and max (exact, see page_select)
            mean = self.policy.page_score == "mean"
            lo, hi = (pool.kmean, pool.kmean) if mean else (pool.kmin, pool.kmax)
            new = select_units(qs, lo[layer], hi[layer], meta.page_tables, ctx, allowed, kk,
                               page_size=pool.spec.page_size, unit_tokens=self.unit,
                               shared=not self.per_query_head, out=sel if reselect == "all" else None)
            if reselect == "some":
                sel.copy_(torch.where(self._fresh[:meta.num_seqs, None, None], new, sel))
        return sparse_decode(q, pool.k[layer], pool.v[layer], meta.page_tables, meta.context_lens_t, sel,
                             self._stream_flags[layer], unit_tokens=self.unit,
                             sink=self.num_sink_units * self.unit, recent_units=self.num_recent_units,
                             stream_sink=self.sink_tokens, stream_local=self.local_tokens, scale=self.scale,
                             value_tables=self._value_tables(layer, sel, meta), **meta.decode_kernel_args())

    def _value_tables(self, layer: int, sel: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Where the fast path's decode reads `layer`'s values, given the selection sel [B, R, k]."""
        return value_tables_of(meta, layer)

    def _prefill(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, i: int) -> torch.Tensor:
        """Retrieval heads: causal over the whole context; streaming heads: sinks + prefill window."""
        ctx, n = meta.context_lens[i], q.shape[0]
        keys = gather_context(self.pool.k[layer], meta.page_tables[i], ctx).to(q.dtype)
        values = gather_context(self.pool.v[layer], meta.values_of(layer)[0][i], ctx).to(q.dtype)
        qg = q.view(n, self.num_kv_heads, self.group, self.head_dim)
        out = torch.empty_like(qg)
        for heads, streaming in ((self._retrieval[layer], False), (self._streaming[layer], True)):
            if not heads.numel():
                continue
            qh = qg[:, heads].reshape(n, -1, self.head_dim)
            kh, vh = keys[:, heads], values[:, heads]
            if streaming:
                o = prefill_streaming(qh, kh, vh, self.scale, sink=self.sink_tokens,
                                      local=self.prefill_local_tokens)
            else:
                self.seed_selection(layer, qg[:, heads], kh, meta, i)
                if skips_blocks(ctx, self.prefill_density):
                    o = prefill_block_sparse(qh.view(n, heads.numel(), self.group, self.head_dim), kh, vh,
                                             self.scale, self.prefill_density, _block_kernel, _dense_kernel)
                else:
                    o = prefill_dense(qh, kh, vh, self.scale)
            out[:, heads] = o.view(n, heads.numel(), self.group, self.head_dim)
        return out.view(n, self.num_q_heads, self.head_dim)

