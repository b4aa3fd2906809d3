"""Iteration-level continuous batching with chunked prefill and preemption by recompute.

Each step spends a token budget: running decodes first (one token each, plus the draft slots
`num_lookahead` of a speculating sequence, so a long prompt never stalls them), then the next chunks
of running prefills, then new sequences while pages last: fair share, the first waiting sequence of the
group (API request) that runs the fewest, so one request of hundreds of sequences cannot hold back a
request that arrives after it. Draft slots never cost a preemption: a sequence whose drafts do not fit
decodes one token. When pages run out, the newest running sequence is preempted: its pages are freed
and it re-enters the queue at the front, to be recomputed (cheaply, through the prefix cache).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from needle.kvcache.page_allocator import PageAllocator
from needle.scheduler.sequence import Sequence, Status


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 on_release: Callable[[Sequence], None]):
        self.bm = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.on_release = on_release  # the attention backend drops per-sequence state here
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        decodes_first = sorted(self.running, key=lambda s: len(s) - s.num_computed > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = len(seq) - seq.num_computed
            if seq.is_decoding:
                n += seq.num_lookahead  # the drafts to verify, trimmed by the budget below
            n = min(n, budget)
            if n > 1 and seq.is_decoding and not self.bm.can_grow(seq.pages, seq.num_computed + n):
                n = 1
            while not self.bm.can_grow(seq.pages, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preemptions += 1
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.grow(seq.pages, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        if batch.num_preemptions:
            return batch  # pages are scarce: admit nobody this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is None:
                break
            # Admit only if its whole prompt fits beside a page of growth per running sequence;
            # otherwise it would be preempted again and again (recompute thrash near a full cache).
            if self.running and self.bm.num_free < self.bm.pages_needed(len(seq)) + len(self.running):
                break
            cached = self.bm.allocate(seq.pages, seq.token_ids, budget)
            if cached is None:
                break
            self.waiting.remove(seq)
            if not seq.ever_admitted:
                seq.ever_admitted = True
                seq.num_cached = cached
                batch.prefix_cache_queries += seq.num_prompt_tokens
                batch.prefix_cache_hits += cached
            seq.num_computed = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - cached, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _next_waiting(self) -> Sequence | None:
        """The first admissible waiting sequence of the group with the fewest running sequences."""
        running = Counter(s.group for s in self.running)
        best = None
        for seq in self.waiting:
            if seq.ready_to_admit and (best is None or running[seq.group] < running[best.group]):
                best = seq
                if not running[seq.group]:
                    break
        return best

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length or abort) and free its pages at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.draft_ids = []
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.pages.page_table:
            self.bm.release(seq.pages)
        self.on_release(seq)
