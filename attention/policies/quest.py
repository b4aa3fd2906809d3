"""Quest: flat top-k over summaries (summary_tokens tokens), ranked by the key min/max bound."""

from __future__ import annotations

import torch

from needle.attention.policies.base import SelectionRequest, SparsePolicy, summary_scores, top_units


class QuestPolicy(SparsePolicy):
    """Unit = one summary; fine-grained, but k is large so the top-k and the gather are wider."""

    name = "quest"

    def select(self, req: SelectionRequest) -> torch.Tensor:
        scores = summary_scores(req, self.page_score)
        return top_units(scores[..., : req.allowed.shape[1]], req.allowed, req.k)
