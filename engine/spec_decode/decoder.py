"""One speculative step, around the engine's ordinary one:

    plan     before scheduling: the controller picks k; each decoding sequence that may speculate
             reserves k draft slots (seq.num_lookahead), which the scheduler counts against the token
             budget and gives pages for (or drops, rather than preempt anybody for drafts);
    propose  after scheduling: the drafter fills the slots the scheduler granted (seq.draft_ids);
    emit     after the forward pass: plain rows are sampled as always, verifying sequences keep the
             drafts verification accepts plus one token (verify.py), then roll back the rest;
    finish   the step's measured time trains the step-time model; telemetry.

Rollback of a sequence that kept j of its k drafts: its KV is committed up to the newest kept draft
(num_computed), prefix-cache hashes are published only for pages of committed tokens, pages past the
sequence's length go back to the pool (they were never hashed), and the key summary holding the last
committed row is recomputed over the committed rows, so every summary again equals a recomputation
from the committed keys (the rejected rows that remain in the newest page are ignored by the summary
and overwritten by the next step's write, which recomputes again).

With k = 0 nothing here touches the step: no slots, no drafter call, the sampler as without
speculation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from needle.engine.runner import ModelRunner
from needle.engine.sampler import Sampler, SamplingFault
from needle.engine.spec_decode.config import SpeculativeConfig
from needle.engine.spec_decode.controller import GoodputController, StepShape
from needle.engine.spec_decode.drafter import Drafter
from needle.engine.spec_decode.verify import verify
from needle.kvcache.page_allocator import PageAllocator
from needle.scheduler.scheduler import Batch
from needle.scheduler.sequence import Sequence, Status

EMA = 0.3  # weight of the newest step in each acceptance average


@dataclass
class SpecStats:
    """One step's speculation telemetry (vLLM's spec_decode_* counters, plus the controller's view)."""

    num_drafts: int = 0  # sequences that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [K] drafts kept at each position
    k: int | None = None  # the draft length chosen this step (None: no sequence could speculate)
    predicted_s: float | None = None  # the step-time model's prediction for this step
    measured_s: float = 0.0
    fit_error: float = float("nan")


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, drafter: Drafter, sampler: Sampler,
                 allocator: PageAllocator, max_model_len: int, runner: ModelRunner):
        self.config, self.drafter, self.sampler, self.runner = config, drafter, sampler, runner
        self.allocator, self.max_model_len = allocator, max_model_len
        self.controller = GoodputController(config.num_speculative_tokens, config.dynamic,
                                            model_drafts=drafter.name != "ngram")
        self.acceptance: dict[int, float] = {}  # seq_id -> EMA of kept / proposed
        self.drafter_acceptance = 0.7  # SmartSpec's starting guess, then the EMA over all sequences
        self.draft_probs: dict[int, torch.Tensor | None] = {}
        self.stats = SpecStats()
        self._shape: StepShape | None = None

    def may_speculate(self, seq: Sequence) -> bool:
        p = seq.params
        if not p.speculative or not seq.is_decoding or p.structured_outputs is not None:
            return False
        # A seeded sampled request draws from its generator once per verified position, so its text
        # depends on how many drafts it verifies: only a fixed K keeps that independent of the batch.
        return self.config.dynamic is False or p.seed is None or p.greedy

    # ---- the step --------------------------------------------------------------------------------

    def plan(self, running: list[Sequence]) -> None:
        self.stats = SpecStats(accepted_per_pos=[0] * self.config.num_speculative_tokens)
        for seq in running:
            seq.num_lookahead = 0  # nothing carried over (a preempted sequence may come back)
        decoding = [s for s in running if s.is_decoding]
        spec = [s for s in decoding if self.may_speculate(s)]
        if not spec:
            return
        k = self.controller.choose([len(s) for s in decoding],
                                   [self.acceptance.get(s.seq_id, self.drafter_acceptance) for s in spec])
        self.stats.k = k
        for seq in spec:
            left = seq.params.max_tokens - seq.num_output if seq.params.max_tokens is not None else k + 1
            limit = self.runner.draft_limit(seq)
            seq.num_lookahead = max(0, min(k, left - 1, self.max_model_len - len(seq) - 1,
                                           k if limit is None else limit))

    def propose(self, batch: Batch) -> None:
        index = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True))
                 if s.num_lookahead and s.is_decoding and n > 1]
        if not index:
            return
        seqs = [batch.seqs[i] for i in index]
        drafts = self.drafter.propose(seqs, [batch.num_new_tokens[i] - 1 for i in index])
        for i, seq, draft in zip(index, seqs, drafts, strict=True):
            n = batch.num_new_tokens[i] - 1
            seq.draft_ids = draft.tokens[:n]
            self.draft_probs[seq.seq_id] = None if draft.probs is None else draft.probs[:n]
            batch.num_new_tokens[i] = 1 + len(seq.draft_ids)
            if not seq.draft_ids:  # nothing to propose (no n-gram match): speculating here gains nothing
                self._account(seq, 0, n, drafter=False)
            self.stats.num_draft_tokens += len(seq.draft_ids)
            self.stats.num_drafts += bool(seq.draft_ids)

    def emit(self, logits: torch.Tensor, emitting: list[Sequence], append: Callable[[Sequence, int], bool],
             fail: Callable[[Sequence], None]) -> int:
        """Sample or verify every emitting sequence (logits: 1 + drafts rows each) -> tokens emitted. A
        sequence whose own numbers break sampling is handed to `fail` (its `error` says why); the rest of
        the batch goes on, as without speculation."""
        rows = logits.split([1 + len(s.draft_ids) for s in emitting])
        plain = [i for i, s in enumerate(emitting) if not s.draft_ids]
        emitted = 0
        if plain:
            tokens = self.sampler(torch.cat([rows[i] for i in plain]), [emitting[i] for i in plain])
            for i, token in zip(plain, tokens, strict=True):
                if token is None:
                    fail(emitting[i])
                elif not emitting[i].is_finished:  # a sibling's fault may have ended it
                    append(emitting[i], token)
                    emitted += 1
        for i, seq in enumerate(emitting):
            if not seq.draft_ids:
                continue
            before = seq.num_output
            drafts, probs = seq.draft_ids, self.draft_probs.pop(seq.seq_id, None)
            if seq.is_finished:  # a sibling's fault ended it
                self.rollback(seq, 0)
                continue
            try:
                kept = verify(self.sampler, seq, rows[i], drafts, probs, lambda t, s=seq: append(s, t))
            except SamplingFault as err:
                seq.error = f"{type(err).__name__}: {err}"
                self.rollback(seq, 0)
                fail(seq)
                continue
            emitted += seq.num_output - before
            self._account(seq, kept, len(drafts))
            self.rollback(seq, kept)
        return emitted

    def rollback(self, seq: Sequence, kept: int) -> None:
        """Commit the kept drafts' KV and give back everything past the sequence's length."""
        rejected = len(seq.draft_ids) - kept
        seq.draft_ids = []
        if seq.status is not Status.RUNNING:
            return  # finished inside the run: its pages are already released
        seq.num_computed += kept
        self.allocator.commit_full_pages(seq.pages, seq.token_ids, seq.num_computed)
        self.allocator.truncate(seq.pages, len(seq))
        last, ps = seq.num_computed - 1, self.allocator.page_size
        self.runner.rollback(seq.seq_id, rejected, seq.pages.page_table[last // ps] * ps + last % ps)

    def finish(self, batch: Batch, seconds: float, shape: StepShape | None) -> SpecStats:
        """After the step: pages reserved for drafts that never came back, the model's training sample."""
        for seq in batch.seqs:
            if seq.num_lookahead and seq.status is Status.RUNNING and not seq.draft_ids:
                self.allocator.truncate(seq.pages, max(len(seq), seq.num_computed))
            seq.num_lookahead = 0
        stats = self.stats
        stats.measured_s = seconds
        if shape is not None and shape.num_seqs:
            stats.predicted_s = self.controller.observe(shape, seconds)
        stats.fit_error = self.controller.fit_error
        return stats

    def release(self, seq_id: int) -> None:
        self.acceptance.pop(seq_id, None)
        self.draft_probs.pop(seq_id, None)
        self.drafter.release(seq_id)

    def _account(self, seq: Sequence, kept: int, proposed: int, drafter: bool = True) -> None:
        self.stats.num_accepted_tokens += kept
        for j in range(kept):
            self.stats.accepted_per_pos[j] += 1
        rate = kept / proposed
        prior = self.acceptance.get(seq.seq_id, self.drafter_acceptance)
        self.acceptance[seq.seq_id] = (1 - EMA) * prior + EMA * rate
        if drafter:
            self.drafter_acceptance = (1 - EMA / 4) * self.drafter_acceptance + EMA / 4 * rate


def step_shape(batch: Batch) -> StepShape:
    """The executed step's shape (after proposing: drafts counted), for the step-time model."""
    ctx = [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
    drafts = [len(s.draft_ids) for s in batch.seqs]
    return StepShape(len(batch.seqs), sum(batch.num_new_tokens), sum(ctx),
                     sum(c * n for c, n in zip(ctx, batch.num_new_tokens, strict=True)), sum(drafts),
                     max(drafts, default=0))
