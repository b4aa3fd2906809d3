"""Turns last-position logits into tokens, one row per sequence, each with its own settings and RNG.

A per-sequence torch.Generator makes seeded sampling independent of what else is in the batch.
A sequence with structured output gets its grammar's token mask (engine/structured_output.py) after
its logit_bias and penalties; logprobs stay those of the model's own distribution, as in vLLM.
A row whose logits or probabilities are not finite fails its own sequence (`SamplingFault`, kept on
`seq.error`); the other rows of the batch are sampled as usual.
"""

from __future__ import annotations

import logging

import torch

from needle.engine.structured_output import Grammars
from needle.scheduler.sequence import Sequence

log = logging.getLogger("needle.engine")


class SamplingFault(RuntimeError):
    """One sequence's sampling went non-finite; only that sequence (and its request) fails."""


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output:
        out = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p, each masking to -inf; logits come temperature-scaled."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def top_logprobs(raw_logits: torch.Tensor, token: int, n: int) -> dict[int, float]:
    logprobs = raw_logits.log_softmax(-1)
    out = {token: logprobs[token].item()}
    if n > 0:
        vals, ids = torch.topk(logprobs, n)
        out.update(zip(ids.tolist(), vals.tolist(), strict=True))
    return out


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], grammars: Grammars | None = None):
        self.eos_token_ids = eos_token_ids
        self.grammars = grammars or Grammars(None, 0, ())  # none: no request can be constrained

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """logits: [S, V] float32 for the S sequences that emit a token this step. -> one token per
        sequence, or None for a sequence that faulted (its `error` says why)."""
        if all(plain_greedy(s) for s in seqs):
            tokens = logits.argmax(-1).tolist()
            # a row's sum is finite exactly when all of it is (NaN and +-inf carry through a sum; logits
            # are far too small to overflow one): one reduction instead of an elementwise check
            finite = torch.isfinite(logits.sum(-1)).tolist()
            if all(finite):
                return tokens
        logits = logits.cpu()  # per-sequence generators live on the CPU
        masks = self.grammars.masks(seqs)
        return [self._guarded(logits[i].clone(), s, masks.get(i)) for i, s in enumerate(seqs)]

    def _guarded(self, logits: torch.Tensor, seq: Sequence, mask: torch.Tensor | None) -> int | None:
        try:
            return self.sample_one(logits, seq, mask)
        except Exception as err:  # the row is this sequence's alone: fail it, not the batch
            seq.error = f"{type(err).__name__}: {err}"
            log.warning("sequence %s-%d failed in the sampler: %s", seq.request_id, seq.index, seq.error)
            return None

    def adjust(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """logit_bias, penalties and the min_tokens ban on one row, given the sequence so far (in place)."""
        p = seq.params
        if not torch.isfinite(logits).all():
            raise SamplingFault("the model produced non-finite logits")
        for token_id, bias in p.logit_bias.items():
            logits[token_id] += bias
        logits = apply_penalties(logits, seq)
        if seq.num_output < p.min_tokens:
            banned = [*p.stop_token_ids, *([] if p.ignore_eos else self.eos_token_ids)]
            logits[banned] = float("-inf")
        return logits

    def sample_one(self, logits: torch.Tensor, seq: Sequence, mask: torch.Tensor | None = None) -> int:
        p = seq.params
        raw = logits.clone() if p.logprobs is not None else None
        logits = self.adjust(logits, seq)
        if mask is not None:
            self.grammars.apply(logits, mask)
        if p.greedy:
            if not torch.isfinite(logits.max()):  # NaN, +inf, or nothing left to pick
                raise SamplingFault("the penalised logits are not finite")
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(target_probs(logits, seq), 1, generator=seq.generator))
        if raw is not None:
            seq.logprobs.append(top_logprobs(raw, token, p.logprobs))
        return token


def target_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The distribution sample_one draws from, for adjusted logits (speculative verification)."""
    p = seq.params
    probs = filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
    if not (torch.isfinite(probs).all() and probs.sum() > 0):
        raise SamplingFault("the sampling probabilities are not finite")
    return probs


def plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return (p.greedy and p.logprobs is None and p.structured_outputs is None and not p.logit_bias
            and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty and seq.num_output >= p.min_tokens)
