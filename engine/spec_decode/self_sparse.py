"""`self_sparse` (MagicDec-style self-speculation): the target model drafts with its own sparse
attention at a small budget (streaming heads + page selection), over the same paged KV cache.

Drafting k tokens runs k single-token decode rounds on a second sparse backend instance (its own kept
selections, the draft budget) over the target's pool: round j feeds the newest token (j = 0) or draft
j - 1 at position len - 1 + j. Between draft and verify, the KV rows of positions len - 1 .. len + k - 2
hold the *draft's* keys and values (computed under draft attention) and their summaries include them;
the verify pass then rewrites every one of those rows (and row len + k - 1) with the request's own
attention mode and recomputes the summaries, so nothing drafted survives into committed KV. Drafts are
the argmax of the draft logits: a deterministic drafter (q one-hot).
"""

from __future__ import annotations

import torch

from needle.attention.base import AttentionMetadata
from needle.engine.runner import ModelRunner
from needle.engine.spec_decode.drafter import Draft
from needle.scheduler.sequence import Sequence


class SelfSparseDrafter:
    name = "self_sparse"

    def __init__(self, runner: ModelRunner, budget: int):
        """`runner`: the target model over the draft's own sparse backend (and, on CUDA, its own graphs:
        a draft round is a plain decode step, so it replays one)."""
        self.runner, self.budget = runner, budget

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts: list[list[int]] = [[] for _ in seqs]
        r = self.runner
        for j in range(max(ks, default=0)):
            index = [i for i, k in enumerate(ks) if k > j]
            ids = [seqs[i].token_ids[-1] if j == 0 else drafts[i][-1] for i in index]
            meta = AttentionMetadata.build(
                seq_ids=[seqs[i].seq_id for i in index], query_lens=[1] * len(index),
                context_lens=[len(seqs[i]) + j for i in index],
                page_tables=[seqs[i].pages.page_table for i in index], page_size=r.page_size,
                device=r.device, modes=["sparse"] * len(index), token_budgets=[self.budget] * len(index))
            hidden = r.forward(torch.tensor(ids, dtype=torch.int64, device=r.device), meta)
            for i, token in zip(index, r.model.logits(hidden).argmax(-1).tolist(), strict=True):
                drafts[i].append(token)
        r.backend.drain_stats()  # the draft's telemetry is not the target's
        return [Draft(d) for d in drafts]

    def release(self, seq_id: int) -> None:
        self.runner.backend.release(seq_id)
