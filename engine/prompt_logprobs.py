"""Prompt logprobs (vLLM's `prompt_logprobs`; the completions API's `echo` with `logprobs`): each prompt
token's logprob given the tokens before it, read off the prefill's own hidden states, chunk by chunk.

Only a request's first sequence computes them, over its whole prompt: such a request's pages are
salted with that sequence's id (`private_salt`), so the prefix cache never skips a position of it,
while its own siblings (n > 1) still share its pages. A sequence preempted mid-prefill keeps the
entries it has; its recompute fills the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from needle.kvcache.prefix_hash import chain_hash
from needle.scheduler.sequence import Sequence

SLICE_ROWS = 256  # logits this many rows at a time: a 2048-token chunk x 49K vocab would be 400 MB

PromptLogprobs = list[dict[int, float] | None]  # per prompt position; position 0 has none


@dataclass
class PromptRows:
    """Final hidden states of one prefill chunk's positions that predict a prompt token."""

    seq: Sequence
    start: int  # prompt position of the first row; row i predicts token start + i + 1
    hidden: torch.Tensor


def wants_prompt_logprobs(seq: Sequence) -> bool:
    return seq.params.prompt_logprobs is not None and seq.index == 0


def private_salt(salt: int | None, seq: Sequence) -> int:
    """A prefix-cache salt no other request shares (sequence ids are never reused)."""
    return chain_hash(salt, [seq.seq_id])


def prompt_rows(seq: Sequence, num_new: int, hidden: torch.Tensor) -> PromptRows | None:
    """The rows of `hidden` (this step's rows of `seq`) whose next token is a prompt token, if it asked."""
    count = min(seq.num_computed + num_new, seq.num_prompt_tokens - 1) - seq.num_computed
    if count <= 0 or not wants_prompt_logprobs(seq):
        return None
    return PromptRows(seq, seq.num_computed, hidden[:count])


@torch.inference_mode()
def record(logits_of, rows: PromptRows, entries: PromptLogprobs) -> None:
    """Write {prompt token: logprob, top-N...} for each row into `entries`, as the sampler writes
    generated tokens' (`top_logprobs`)."""
    n = rows.seq.params.prompt_logprobs
    targets = rows.seq.token_ids[rows.start + 1:rows.start + 1 + len(rows.hidden)]
    for lo in range(0, len(targets), SLICE_ROWS):
        logprobs = logits_of(rows.hidden[lo:lo + SLICE_ROWS]).log_softmax(-1)
        chunk = targets[lo:lo + SLICE_ROWS]
        picked = logprobs.gather(1, torch.tensor(chunk, device=logprobs.device)[:, None])[:, 0].tolist()
        top_vals, top_ids = logprobs.topk(n, -1) if n else (logprobs[:, :0], logprobs[:, :0].long())
        for i, (token, lp, ids, vals) in enumerate(zip(chunk, picked, top_ids.tolist(), top_vals.tolist(),
                                                       strict=True)):
            entry = {token: lp}
            entry.update(zip(ids, vals, strict=True))
            entries[rows.start + lo + i + 1] = entry
