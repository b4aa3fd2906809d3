"""The page-selection interface for retrieval heads, and the tensor helpers its policies share.

A policy sees one layer's decode queries of a batch and picks, per selector head, the `k` selection
units (runs of `unit_tokens` consecutive positions) it expects to hold most of the attention mass.
The backend decides which units are eligible (inside the context, not the always-kept sink and
recent units) and turns units into KV slots; a policy only ranks.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass

import torch

from needle.kvcache.pool import KVPool


@dataclass
class SelectionRequest:
    """One layer's selection problem for a batch of B decoding sequences.

    Selector heads: with per-query-head selection H = Hq and G = 1; with a selection shared by a GQA
    group, H = Hkv and G = Hq // Hkv query heads vote together.
    """

    pool: KVPool
    layer: int
    q: torch.Tensor  # [B, H, G, D] RoPE'd queries of this step
    kv_heads: torch.Tensor  # [H] int64: the KV head each selector head reads
    page_tables: torch.Tensor  # [B, P] pages of each sequence
    context_lens: torch.Tensor  # [B] int64
    allowed: torch.Tensor  # [B, U] bool: units the policy may choose
    k: int  # units to choose per selector head


class SparsePolicy(ABC):
    """Ranks selection units of `unit_tokens` tokens for each selector head; policies that read the key
    summaries score each summary by `page_score` (see summary_scores).

    `coarse_units`: the policy ranks units of the configured size (--sparse-unit-tokens); otherwise
    a unit is one summary (`summary_tokens`), as Quest and HiP define theirs.
    """

    name: str
    coarse_units = False
    query_aware = True  # ranks by the query (the prompt-aware seed applies); the recent baseline does not
    scores_units = False  # unit_scores estimates each unit's attention logit (the top-p budget needs it)

    def __init__(self, unit_tokens: int, summary_tokens: int, page_score: str = "bound"):
        if page_score not in PAGE_SCORES:
            raise ValueError(f"unknown page score {page_score!r}; expected one of {PAGE_SCORES}")
        if unit_tokens % summary_tokens:
            raise ValueError(f"unit of {unit_tokens} tokens must be a multiple of {summary_tokens}")
        self.unit_tokens = unit_tokens if self.coarse_units else summary_tokens
        self.page_score = page_score

    def select(self, req: SelectionRequest) -> torch.Tensor:
        """-> [B, H, k] int64 unit indices, best first; -1 where fewer than k units are allowed."""
        return top_units(self.unit_scores(req), req.allowed, req.k)

    def unit_scores(self, req: SelectionRequest) -> torch.Tensor:
        """-> [B, H, U] each unit's estimated q.k (unscaled; ranks the units, and softmaxed it
        estimates their attention mass). Policies that rank otherwise override `select` instead."""
        raise NotImplementedError(f"the {self.name} policy ranks units without scoring each one")


def token_slots(page_tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat KV slots of token positions; positions [B, ...] index into row b of page_tables."""
    b = page_tables.shape[0]
    pages = page_tables.long().gather(1, (positions // page_size).reshape(b, -1)).view_as(positions)
    return pages * page_size + positions % page_size


def gather_heads(cache: torch.Tensor, slots: torch.Tensor, kv_heads: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """cache [pages, page_size, Hkv, D] of one layer; slots [B, H, N] read from KV head kv_heads[h]
    -> [B, H, N, D] in `dtype`, the queries' (pages may be stored in fewer bytes: --kv-cache-dtype).
    Only the named rows are read, which is what makes sparse decode cheap."""
    hkv, d = cache.shape[-2], cache.shape[-1]
    flat = slots * hkv + kv_heads.view(1, -1, 1)
    return cache.reshape(-1, d)[flat].to(dtype)


PAGE_SCORES = ("mean", "bound")


def summary_scores(req: SelectionRequest, kind: str) -> torch.Tensor:
    """Score of every summary for each selector head, the max over its G query heads
    -> [B, H, P * summaries_per_page] (unwritten pages: junk, the caller masks them with `allowed`).

    bound: Quest's upper bound of q.k in the page, sum_c max(q_c * kmin_c, q_c * kmax_c);
    mean:  q.kmean, the page's mean logit (ShadowKV's landmarks). The bound never ranks a page below
    its best key, but is loose where key channels spread widely (then every page looks alike).
    """
    if kind == "bound":
        kmin, kmax = _summary(req, req.pool.kmin), _summary(req, req.pool.kmax)
        score = req.q.clamp(min=0) @ kmax + req.q.clamp(max=0) @ kmin
    else:
        score = req.q @ _summary(req, req.pool.kmean)
    return score.amax(dim=2)


def _summary(req: SelectionRequest, summary: torch.Tensor | None) -> torch.Tensor:
    """One layer's summary of each sequence's summaries, for each selector head -> [B, H, D, L]."""
    assert summary is not None, "the pool keeps no key summaries"
    b = req.page_tables.shape[0]
    hkv, d = req.pool.spec.num_kv_heads, req.pool.spec.head_dim
    rows = summary[req.layer][req.page_tables.long()].view(b, -1, hkv, d)
    return rows[:, :, req.kv_heads].permute(0, 2, 3, 1)


def top_p_cut(units: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor, p: float,
              floor: int) -> torch.Tensor:
    """Twilight's top-p budget: of units [B, H, k] (best first, -1 = none) keep the shortest prefix
    that holds a share p of the estimated attention mass (softmax of logits [B, H, U] over the allowed
    units [B, U]), and at least `floor` units; the rest become -1."""
    mass = logits.float().masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1)
    ranked = mass.gather(-1, units.clamp(min=0)).masked_fill(units < 0, 0.0)
    held_before = ranked.cumsum(dim=-1) - ranked  # the mass of the better units
    keep = (held_before < p) | (torch.arange(units.shape[-1], device=units.device) < floor)
    return units.masked_fill(~keep, -1)


def top_units(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Best k allowed units of scores [B, H, U] -> [B, H, k], -1 where fewer than k are allowed."""
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    vals, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)
    idx = idx.masked_fill(vals == float("-inf"), -1)
    return torch.nn.functional.pad(idx, (0, k - idx.shape[-1]), value=-1)
