"""Sparse attention over offloaded values (kvcache/value_tiers.py): the sparse backends (torch, and Triton
on CUDA), whose retrieval heads read the values of host pages through the device value cache.

Which values must stay on the device follows from what each sequence reads: a prefill chunk, a
dense-mode request and a sequence whose context fits its budget read everything (so all of their pages
are resident: a prefix-cache hit on host pages fetches them back once, which keeps dense results exact
rather than refusing such requests); a sparse decode reads the sink units, the streaming heads' local
window and the retrieval heads' newest units from resident pages, and only the chosen units from the
cache. Selections are kept for `selector_interval` steps, so the steps between reselections find their
pages in the cache.
"""

from __future__ import annotations

import torch

from needle.attention.base import AttentionMetadata
from needle.attention.sparse import SparseBackend, _Decode
from needle.attention.triton_backend import TritonSparseBackend, value_tables_of
from needle.kvcache.value_tiers import ValueTiers


class OffloadSparseBackend(SparseBackend):
    name = "sparse-offload"

    tiers: ValueTiers  # set by the engine once the tiers exist

    def resident_span(self, context: int, mode: str, budget: int) -> tuple[int, int] | None:
        """For a decoding sequence at `context` tokens (this step's included): (n, first) such that its
        pages [:n] and [first:] must be resident, or None when it reads every page (dense)."""
        if mode == "dense" or context <= self._whole_units(budget or self.token_budget):
            return None
        ps = self.pool.spec.page_size
        sink = max(self.sink_tokens, self.num_sink_units * self.unit)
        newest_unit = (context - 1) // self.unit - self.num_recent_units + 1
        first = max(0, min(context - self.local_tokens, newest_unit * self.unit))
        return -(-sink // ps), first // ps

    def _retrieval_values(self, layer: int, pos: torch.Tensor, valid: torch.Tensor,
                          plan: _Decode) -> torch.Tensor:
        return fetch_selected(self.tiers, layer, plan.value_tables, plan.page_tables, pos, valid)


class TritonOffloadSparseBackend(TritonSparseBackend, OffloadSparseBackend):
    """The Triton kernels over offloaded values: after each layer's page selection the host pages it
    chose are fetched and the decode kernel reads values through the patched value tables. Steps run
    eagerly (no CUDA graph): what a layer fetches depends on what it just selected, which the host must
    see. Steps the fast path does not take run the torch path of OffloadSparseBackend."""

    name = "triton-sparse-offload"

    def graph_key(self, meta: AttentionMetadata):
        return None

    def _value_tables(self, layer: int, sel: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        tables = value_tables_of(meta, layer)
        if tables is None:
            return None
        ctx = meta.context_lens_t.long()[:, None, None]
        rows = sel.shape[1]  # selector rows: KV heads, or query heads when they select alone
        kv_head = torch.arange(rows, device=sel.device) * (self.num_q_heads // rows) // self.group
        selects = self._stream_flags[layer][kv_head] == 0  # streaming heads read no chosen unit
        pos = (sel.long()[..., None] * self.unit + torch.arange(self.unit, device=sel.device)).flatten(2)
        valid = ((sel >= 0) & selects[None, :, None]).repeat_interleave(self.unit, dim=2) & (pos < ctx)
        return fetch_selected(self.tiers, layer, tables, meta.page_tables, pos.clamp(min=0).minimum(ctx - 1),
                              valid)


def fetch_selected(tiers: ValueTiers, layer: int, tables: torch.Tensor, page_tables: torch.Tensor,
                   pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Value tables [B, P] in which the host pages that pos [B, H, N] reads (where valid) point at their
    value-cache slots in `layer`, fetched there first."""
    b = tables.shape[0]
    logical = (pos // tiers.pool.spec.page_size).reshape(b, -1)
    resolved = tiers.resolve(layer, tables, page_tables, logical, valid.reshape(b, -1))
    return resolved.clamp(min=0)  # positions masked out may point at host pages: read slot 0
