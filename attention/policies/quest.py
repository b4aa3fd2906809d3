"""Quest: flat top-k over summaries (summary_tokens tokens), ranked by the key min/max bound."""

from __future__ import annotations

import torch

from needle.attention.policies.base import SelectionRequest, SparsePolicy, summary_scores


class QuestPolicy(SparsePolicy):
    """Unit = one summary; fine-grained, but k is large so the top-k and the gather are wider."""

    name = "quest"
    scores_units = True

    def unit_scores(self, req: SelectionRequest) -> torch.Tensor:
        return summary_scores(req, self.page_score)[..., : req.allowed.shape[1]]
