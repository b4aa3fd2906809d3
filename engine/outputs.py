"""What the engine hands back: vLLM's RequestOutput / CompletionOutput shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    # One dict per generated token: {token_id: logprob} of the top-N plus the sampled token.
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A snapshot of one request. In streaming mode `outputs[i].text` / `token_ids` hold only the delta."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
    error: str | None = None  # set on the last output of a request that failed on its own
    # With prompt_logprobs: per prompt token, {token_id: logprob} of it and the top-N (None for the
    # first token); on the request's first output only.
    prompt_logprobs: list[dict[int, float] | None] | None = None
