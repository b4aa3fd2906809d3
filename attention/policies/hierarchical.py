"""LServe's hierarchical paging: a physical unit of several summaries scores as its best page."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from needle.attention.policies.base import SelectionRequest, SparsePolicy, summary_scores


class HierarchicalPolicy(SparsePolicy):
    """Ranks units of `unit_tokens` (e.g. 64) by the max score of their 16-token summaries:
    coarse units keep the gather contiguous and the top-k small, while the score stays as sharp as a
    16-token page's (a unit holding one relevant page still ranks high)."""

    name = "hierarchical"
    coarse_units = True
    scores_units = True

    def unit_scores(self, req: SelectionRequest) -> torch.Tensor:
        pages_per_unit = self.unit_tokens // req.pool.spec.summary_tokens
        scores = summary_scores(req, self.page_score)
        num_units = req.allowed.shape[1]
        width = num_units * pages_per_unit
        scores = F.pad(scores, (0, max(0, width - scores.shape[-1])), value=float("-inf"))[..., :width]
        return scores.view(*scores.shape[:2], num_units, pages_per_unit).amax(dim=-1)
