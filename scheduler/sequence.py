"""One generated sequence: its tokens, how far its KV is computed, and its pages."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from needle.kvcache.page_allocator import SeqPages
from needle.scheduler.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # choice index within its request (n > 1)
    token_ids: list[int]
    params: SamplingParams
    arrival: float
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached: int = 0  # prompt tokens served by the prefix cache at the first admission
    ever_admitted: bool = False
    pages: SeqPages = field(default_factory=SeqPages)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_sibling: Sequence | None = None  # n > 1: wait until it has prefilled, then share its pages
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    group: str = ""  # the API request it belongs to: batch slots are shared fairly between groups
    error: str | None = None  # why the sampler failed this sequence (its request fails with it)
    # Speculative decoding: draft slots the scheduler reserves this step, and the drafts proposed into
    # them (never part of token_ids: they are verified, then the accepted ones are appended).
    num_lookahead: int = 0
    draft_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """Past its prompt with only its newest token to compute: the state a sequence speculates from."""
        return self.num_output > 0 and len(self.token_ids) - self.num_computed == 1

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def ready_to_admit(self) -> bool:
        first = self.first_sibling
        return first is None or first.is_finished or first.num_computed >= first.num_prompt_tokens - 1
