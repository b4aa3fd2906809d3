"""Prompt lookup (vLLM's `ngram`): find the longest suffix of the sequence, prompt_lookup_max down to
prompt_lookup_min tokens long, that occurred earlier in prompt + output, and propose the tokens that
followed its most recent earlier occurrence. No model runs; the draft is deterministic (q one-hot)."""

from __future__ import annotations

from needle.engine.spec_decode.drafter import Draft
from needle.scheduler.sequence import Sequence


def lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest matching suffix (or [])."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix, last = tokens[length - n:], tokens[-1]
        for start in range(length - n - 1, -1, -1):  # the most recent occurrence first
            if tokens[start + n - 1] == last and tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class NgramDrafter:
    name = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(lookup(s.token_ids, k, self.min_n, self.max_n)) for s, k in zip(seqs, ks, strict=True)]

    def release(self, seq_id: int) -> None:
        pass
