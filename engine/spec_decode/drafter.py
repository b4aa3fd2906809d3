"""What every drafter answers: up to k draft tokens per decoding sequence, and when to forget one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from needle.scheduler.sequence import Sequence


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] the drafter's distribution; None: one-hot


class Drafter(Protocol):
    name: str

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Up to ks[i] drafts following seqs[i].token_ids (each sequence's pages hold room for them)."""

    def release(self, seq_id: int) -> None:
        """The sequence left the batch (finished, aborted or preempted): drop what is kept for it."""
