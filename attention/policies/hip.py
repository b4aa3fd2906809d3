"""HiP-style hierarchical pruning: a tree search for the top-k key blocks, guided by probe keys.

No summaries: start from at most k equal spans covering the context, split each span in two, score
each half by q.k of one representative key (its middle token), keep the best k halves, and repeat
until spans are single blocks. That reads ~2k keys per level and log2(context / (k * block)) levels
instead of every key or every page summary.
"""

from __future__ import annotations

import torch

from needle.attention.policies.base import (
    SelectionRequest,
    SparsePolicy,
    gather_heads,
    token_slots,
    top_units,
)


class HipPolicy(SparsePolicy):
    """Unit = one block of `unit_tokens` keys (a summary); the search ranks blocks by probes."""

    name = "hip"

    def select(self, req: SelectionRequest) -> torch.Tensor:
        b, h = req.q.shape[:2]
        num_units, k = req.allowed.shape[1], req.k
        span = 1
        while span * k < num_units:
            span *= 2
        # Allowed units per span are counted with a prefix sum so a span with none is never kept.
        counts = torch.nn.functional.pad(req.allowed.long().cumsum(1), (1, 0))
        starts = torch.arange(0, num_units, span, device=req.q.device).expand(b, h, -1)
        while span > 1:
            span //= 2
            starts = torch.cat([starts, starts + span], dim=-1)
            starts = self._keep_best(req, starts, span, counts, min(k, starts.shape[-1]))
        return top_units_from_candidates(starts, self._probe(req, starts, 1, counts), k)

    def _keep_best(self, req: SelectionRequest, starts: torch.Tensor, span: int, counts: torch.Tensor,
                   keep: int) -> torch.Tensor:
        scores = self._probe(req, starts, span, counts)
        best = scores.topk(keep, dim=-1).indices
        return starts.gather(-1, best)

    def _probe(self, req: SelectionRequest, starts: torch.Tensor, span: int,
               counts: torch.Tensor) -> torch.Tensor:
        """q.k of each span's middle key (max over the G voting heads); -inf where no unit is allowed."""
        b = starts.shape[0]
        num_units = req.allowed.shape[1]
        lo = starts.clamp(max=num_units).reshape(b, -1)
        hi = (starts + span).clamp(max=num_units).reshape(b, -1)
        has_allowed = (counts.gather(1, hi) - counts.gather(1, lo) > 0).view_as(starts)
        mid = (starts * self.unit_tokens + span * self.unit_tokens // 2)
        mid = torch.minimum(mid, req.context_lens.view(-1, 1, 1) - 1)
        slots = token_slots(req.page_tables, mid, req.pool.spec.page_size)
        keys = gather_heads(req.pool.k[req.layer], slots, req.kv_heads, req.q.dtype)  # [B, H, N, D]
        scores = (req.q @ keys.transpose(-1, -2)).amax(dim=2)  # [B, H, N]
        return scores.masked_fill(~has_allowed, float("-inf"))


def top_units_from_candidates(blocks: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Order candidate blocks [B, H, N] by score; -1 for empty candidates; pad to k."""
    every = torch.ones(scores.shape[0], scores.shape[-1], dtype=torch.bool, device=scores.device)
    order = top_units(scores, every, k)
    picked = blocks.gather(-1, order.clamp(min=0))
    return picked.masked_fill(order < 0, -1)
