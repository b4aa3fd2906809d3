"""The one check of a request before it joins the batch: what SamplingParams cannot know on its own
(the vocabulary, the context length, the KV capacity, the server's attention mode).

Every refusal is a `RequestError` (a ValueError) naming the offending parameter, so the HTTP server can
answer 400 with OpenAI's `param` and `code` without checking anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from needle.scheduler.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the engine refuses; `param` names the request field, `code` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthError(RequestError):
    """Prompt + completion exceed the model's context; `param` is the prompt's field ("prompt" or
    "messages"), which only the caller knows."""

    def __init__(self, message: str):
        super().__init__(message, param=None, code="context_length_exceeded")


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    attention: str  # the engine's --attention: "dense" engines keep no key summaries
    max_logprobs: int = 20  # --max-logprobs: the most top logprobs per token a request may ask for


def validate_request(ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    vocab = limits.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    for name, token_ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in token_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise RequestError(f"{name} token id {bad} is outside the vocabulary [0, {vocab})", param=name)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limits.max_logprobs:
            raise RequestError(f"{name} must be at most {limits.max_logprobs} (the server's --max-logprobs), "
                               f"got {value}", param=name)
    num_prompt, completion = len(ids), params.max_tokens or 0
    if num_prompt + completion > limits.max_model_len or num_prompt >= limits.max_model_len:
        raise ContextLengthError(  # vLLM's and OpenAI's wording: clients parse the numbers out of it
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
            f"requested {num_prompt + completion} tokens ({num_prompt} in the messages, {completion} "
            f"in the completion). Please reduce the length of the messages or completion.")
    if num_prompt + completion > limits.kv_capacity_tokens:
        raise RequestError(f"the request needs {num_prompt + completion} tokens of KV cache but the cache "
                           f"holds {limits.kv_capacity_tokens}", param="max_tokens")
    override = params.attention
    if override is not None and override.mode == "sparse" and limits.attention == "dense":
        raise RequestError("this server runs dense attention (--attention dense), so it cannot serve "
                           "attention.mode 'sparse'; start it with --attention sparse",
                           param="attention.mode")
