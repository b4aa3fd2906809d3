"""Quest: flat top-k over logical pages (summary_block tokens), ranked by the key min/max bound."""

from __future__ import annotations

import torch

from needle.attention.policies.base import SelectionRequest, SparsePolicy, logical_page_scores, top_units


class QuestPolicy(SparsePolicy):
    """Unit = one logical page; fine-grained, but k is large so the top-k and the gather are wider."""

    name = "quest"

    def select(self, req: SelectionRequest) -> torch.Tensor:
        scores = logical_page_scores(req, self.page_score)
        return top_units(scores[..., : req.allowed.shape[1]], req.allowed, req.k)
