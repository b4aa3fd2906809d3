"""Sparse attention over offloaded values (kvcache/value_tiers.py): the torch sparse backend, whose
retrieval heads read the values of host pages through the device value cache.

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

from needle.attention.sparse import SparseBackend, _Decode
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
        """Value tables in which the host pages that pos reads point at their value-cache slots."""
        tables = plan.value_tables
        b, width = tables.shape
        logical = (pos // self.pool.spec.page_size).reshape(b, -1)
        on_host = (tables.gather(1, logical) < 0) & valid.reshape(b, -1)
        if not bool(on_host.any()):
            return tables.clamp(min=0)  # positions masked out may point at host pages: read slot 0
        rows = torch.arange(b, device=pos.device)[:, None].expand_as(logical)[on_host]
        cells = torch.unique(rows * width + logical[on_host])  # (sequence, page) pairs, flat
        pages = plan.page_tables.reshape(-1)[cells].tolist()
        distinct = list(dict.fromkeys(pages))  # sequences sharing a prefix share its cache entries
        slot_of = dict(zip(distinct, self.tiers.fetch(layer, distinct), strict=True))
        tables = tables.clone()
        tables.view(-1)[cells] = torch.tensor([slot_of[p] for p in pages], dtype=tables.dtype,
                                              device=tables.device)
        return tables.clamp(min=0)
