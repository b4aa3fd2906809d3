"""CUDA attention backends on the Triton kernels (attention/kernels/): the same results as dense.py and
sparse.py, which stay the CPU path and the reference.

`use_triton(backend)` switches an engine's DenseBackend or SparseBackend to its Triton version in place
(same object, so the engine's release hooks stay wired).

Decode steps are CUDA-graph safe (engine/cuda_graph.py): every op reads only device tensors whose shapes
depend on the batch size and the block-table width, and `graph_key` names the graph a step needs.

Sparse decode keeps sparse.py's semantics (streaming heads: sinks + local window; retrieval heads: sink
units + newest units + the policy's top-k units, chosen per KV head or per query head), with one change
that graphs need: a selection lives per batch row, and the whole batch reselects together every
`selector_interval` steps or when the batch changes. Steps the fast path does not cover (prefill chunks
mixed with decodes, dense fallbacks, the hip policy) run through SparseBackend's torch code, except
prefill attention itself, which runs on flash attention here.
"""

from __future__ import annotations

import math

import torch

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.attention.kernels.kv_append import kv_append
from needle.attention.kernels.page_select import select_units
from needle.attention.kernels.paged_decode import paged_decode, sparse_decode
from needle.attention.kernels.prefill import gather_context, prefill_dense, prefill_streaming
from needle.attention.sparse import SparseBackend, _Step
from needle.kvcache.pool import KVPool


def append(pool: KVPool, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write the step's K/V and keep the key summaries exact (when the pool has them)."""
    summaries = None if pool.kmin is None else (pool.kmin[layer], pool.kmax[layer], pool.kmean[layer])
    kv_append(pool.k[layer], pool.v[layer], summaries, k, v, slots, pool.spec.summary_block)


class TritonDenseBackend(DenseBackend):
    name = "triton-dense"

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        _refuse_window(window)
        append(self.pool, layer, k, v, meta.slot_mapping)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if meta.is_decode:
            return paged_decode(q, self.pool.k[layer], self.pool.v[layer], meta.block_tables,
                                meta.context_lens_t, scale)
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        dec = [i for i, n in enumerate(meta.query_lens) if n == 1]
        if dec:
            rows = torch.tensor([starts[i] for i in dec], device=q.device)
            idx = torch.tensor(dec, device=q.device)
            out[rows] = paged_decode(q[rows], self.pool.k[layer], self.pool.v[layer], meta.block_tables[idx],
                                     meta.context_lens_t[idx], scale)
        for i, n in enumerate(meta.query_lens):
            if n > 1:
                rows = slice(starts[i], starts[i] + n)
                out[rows] = self.prefill(layer, q[rows], k[rows], v[rows], meta.block_tables[i],
                                         meta.context_lens[i])
        return out

    def prefill(self, layer: int, q, k, v, block_table: torch.Tensor, ctx: int) -> torch.Tensor:
        if ctx > q.shape[0]:  # a later chunk: attend to the whole context in the pages
            k = gather_context(self.pool.k[layer], block_table, ctx)
            v = gather_context(self.pool.v[layer], block_table, ctx)
        return prefill_dense(q, k, v, 1.0 / math.sqrt(q.shape[-1]))

    def graph_key(self, meta: AttentionMetadata):
        return "decode" if meta.is_decode else None


class TritonSparseBackend(SparseBackend):
    name = "triton-sparse"

    def _init_triton(self) -> None:
        self.dense = TritonDenseBackend(self.pool)
        dev = self.pool.device
        self._stream_flags = [torch.tensor(row, dtype=torch.int32, device=dev)
                              for row in self.profile.streaming]
        self._fast: tuple[bool, int] | None = None  # (reselect, k) when this step runs the fast path
        self._last_ids: list[int] = []
        self._since = 0
        self._last_k = -1
        self._sel: list[torch.Tensor] = []
        self._rows = 0
        self._version = 0

    def reserve(self, batch: int, k: int | None = None) -> None:
        """Selection buffers for up to `batch` rows and k units (fixed addresses, as CUDA graphs need;
        a reallocation bumps the graph key so stale graphs are never replayed)."""
        rows = self.num_q_heads if self.per_query_head else self.num_kv_heads
        k = max(k or 0, self.token_budget // self.unit)
        if batch > self._rows or not self._sel or self._sel[0].shape[2] < k:
            self._rows = max(batch, self._rows)
            self._version += 1
            self._sel = [torch.full((self._rows, rows, k), -1, dtype=torch.int32, device=self.pool.device)
                         for _ in range(self.profile.num_layers)]

    def _fast_plan(self, meta: AttentionMetadata) -> tuple[bool, int] | None:
        if not meta.is_decode or self.policy.name not in ("hierarchical", "quest"):
            return None
        if meta.modes and any(m == "dense" for m in meta.modes):
            return None
        budgets = {self.budget_of(meta, i) for i in range(meta.num_seqs)}
        if len(budgets) != 1 or min(meta.context_lens) <= next(iter(budgets)):
            return None
        k = next(iter(budgets)) // self.unit - self.num_sink_units - self.num_recent_units
        reselect = (meta.seq_ids != self._last_ids or self._since >= self.selector_interval
                    or k != self._last_k)
        self._since = 1 if reselect else self._since + 1
        self._last_ids, self._last_k = list(meta.seq_ids), k
        return reselect, k

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._fast = self._fast_plan(meta)
        if self._fast is None:
            self._last_ids = []  # the torch path keeps its own selections; ours are stale after it
            super().begin_step(meta)
            return
        self._flush_step_stats()
        self._step = _Step([], [], None, False)
        self.reserve(meta.num_seqs, self._fast[1])

    def graph_key(self, meta: AttentionMetadata):
        return None if self._fast is None else ("sparse", self._fast[0], self._fast[1], self._version)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        _refuse_window(window)
        if self._fast is None:
            return super().forward(layer, q, k, v, meta)
        if layer < self.dense_layers:
            return self.dense.forward(layer, q, k, v, meta)
        pool = self.pool
        append(pool, layer, k, v, meta.slot_mapping)
        reselect, kk = self._fast
        b = q.shape[0]
        sel = self._sel[layer][:b, :, :kk]
        if reselect:
            ctx = meta.context_lens_t
            num_units = meta.block_tables.shape[1] * pool.spec.page_size // self.unit
            u = torch.arange(num_units, device=q.device)
            newest_allowed = (ctx.long() - 1) // self.unit - self.num_recent_units + 1
            allowed = (u[None, :] >= self.num_sink_units) & (u[None, :] < newest_allowed[:, None])
            # q . kmean is the bound kernel fed the mean as both min and max (exact, see page_select)
            mean = self.policy.page_score == "mean"
            lo, hi = (pool.kmean, pool.kmean) if mean else (pool.kmin, pool.kmax)
            sel.copy_(select_units(q, lo[layer], hi[layer], meta.block_tables, ctx, allowed, kk,
                                   page_size=pool.spec.page_size, unit_tokens=self.unit,
                                   shared=not self.per_query_head))
        return sparse_decode(q, pool.k[layer], pool.v[layer], meta.block_tables, meta.context_lens_t, sel,
                             self._stream_flags[layer], unit_tokens=self.unit,
                             sink=self.num_sink_units * self.unit, recent_units=self.num_recent_units,
                             stream_sink=self.sink_tokens, stream_local=self.local_tokens, scale=self.scale)

    def _prefill(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, i: int) -> torch.Tensor:
        """Retrieval heads: causal over the whole context; streaming heads: sinks + prefill window."""
        ctx, n = meta.context_lens[i], q.shape[0]
        keys = gather_context(self.pool.k[layer], meta.block_tables[i], ctx)
        values = gather_context(self.pool.v[layer], meta.block_tables[i], ctx)
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
                o = prefill_dense(qh, kh, vh, self.scale)
            out[:, heads] = o.view(n, heads.numel(), self.group, self.head_dim)
        return out.view(n, self.num_q_heads, self.head_dim)


def _refuse_window(window: int | None) -> None:
    """The kernels read whole contexts; the runner keeps sliding-window models on the torch backends."""
    if window is not None:
        raise NotImplementedError("the Triton kernels have no sliding window; run with NEEDLE_TRITON=0")


def use_triton(backend: AttentionBackend) -> AttentionBackend:
    """Switch a torch backend to its Triton version in place; other backends are returned unchanged."""
    if isinstance(backend, SparseBackend) and not isinstance(backend, TritonSparseBackend):
        backend.__class__ = TritonSparseBackend
        backend._init_triton()
    elif type(backend) is DenseBackend:
        backend.__class__ = TritonDenseBackend
    return backend
