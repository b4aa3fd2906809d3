"""Verification: which drafts a sequence keeps, position by position, with its own sampling settings.

Row j of a verifying sequence's logits is the target's prediction after its newest token and drafts
0..j-1. At each position the row is adjusted exactly as the non-speculative sampler would (logit_bias,
penalties over the tokens so far, the min_tokens ban), then:
  * greedy: the draft is kept while it equals the target's argmax; the first mismatch emits the argmax;
  * sampling (lossless rejection sampling): draft x is kept with probability min(1, p(x) / q(x)); on
    rejection the token is drawn from norm(max(0, p - q)); q is one-hot for a deterministic drafter,
    which reduces to "keep x with probability p(x), else draw from p without x".
After the last draft, if all were kept, row k gives the bonus token. Every emitted token goes through
`append`, which runs the stop checks; a sequence that stops ends the run there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from needle.engine.sampler import Sampler, plain_greedy, target_probs, top_logprobs
from needle.scheduler.sequence import Sequence


def accept_or_resample(p: torch.Tensor, x: int, q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[bool, int]:
    """One position of rejection sampling: (draft kept?, the token emitted). p: target probabilities [V];
    q: the drafter's probabilities [V], or None when the drafter is deterministic (one-hot at x)."""
    qx = 1.0 if q is None else float(q[x])
    u = float(torch.rand((), generator=generator))
    if qx > 0 and u * qx < float(p[x]):  # u < p(x) / q(x)
        return True, x
    residual = p.clone()
    if q is None:
        residual[x] = 0.0
    else:
        residual = (residual - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q: rejection is impossible in exact arithmetic
        residual = p
    return False, int(torch.multinomial(residual, 1, generator=generator))


def verify(sampler: Sampler, seq: Sequence, logits: torch.Tensor, drafts: list[int],
           draft_probs: torch.Tensor | None, append: Callable[[int], bool]) -> int:
    """logits: [len(drafts) + 1, V] for the sequence's verified positions. Emits through append (which
    returns True once the sequence finished) -> the number of drafts kept."""
    p = seq.params
    if plain_greedy(seq):
        targets = logits.argmax(-1).tolist()
        for j, target in enumerate(targets):
            kept = j < len(drafts) and target == drafts[j]
            if append(target) or not kept:
                return j + int(kept)
    logits = logits.cpu()  # per-sequence generators live on the CPU
    for j in range(len(drafts) + 1):
        row = logits[j].clone()
        raw = row.clone() if p.logprobs is not None else None
        row = sampler.adjust(row, seq)
        if j == len(drafts):
            kept, token = False, (int(row.argmax()) if p.greedy else
                                  int(torch.multinomial(target_probs(row, seq), 1, generator=seq.generator)))
        elif p.greedy:
            token = int(row.argmax())
            kept = token == drafts[j]
        else:
            q = None if draft_probs is None else draft_probs[j]
            kept, token = accept_or_resample(target_probs(row, seq), drafts[j], q, seq.generator)
        if raw is not None:
            seq.logprobs.append(top_logprobs(raw, token, p.logprobs))
        if append(token) or not kept:
            return j + int(kept)
    return len(drafts)
