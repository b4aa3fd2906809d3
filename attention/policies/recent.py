"""StreamingLLM as a policy: retrieval heads read sinks + the newest units, ignoring the query.

The baseline every selection policy must beat: with it, every head of a sparse layer reads only the
attention sinks and a local window filling the same token budget, so a fact outside that window is lost.
"""

from __future__ import annotations

import torch

from needle.attention.policies.base import SelectionRequest, SparsePolicy, top_units


class RecentPolicy(SparsePolicy):
    """Unit = one summary; ranks allowed units by position, newest first."""

    name = "recent"
    query_aware = False

    def select(self, req: SelectionRequest) -> torch.Tensor:
        b, h = req.q.shape[:2]
        recency = torch.arange(req.allowed.shape[1], dtype=torch.float32, device=req.q.device)
        return top_units(recency.expand(b, h, -1), req.allowed, req.k)
