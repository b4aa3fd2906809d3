"""The OpenAI / vLLM wire format as pydantic models.

Requests accept unknown fields (clients send vendor extras; rejecting them breaks drop-in use) and
keep them in `model_extra` so the handler can log them. Known fields are strictly typed (`"1"` and
`true` are not numbers). Field names and defaults are OpenAI's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from needle.scheduler.sampling_params import AttentionOverride, SamplingParams, StructuredOutputsParams
from needle.server.errors import APIError, bad_request

# SamplingParams' messages start with the field name ("top_p must be ..."); this maps it to the wire name.
_PARAM_NAMES = {
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "logprobs", "prompt_logprobs", "attention.mode",
    "attention.token_budget", "seed", "stop", "min_tokens", "logit_bias", "stop_token_ids",
}


# OpenAI / vLLM request fields that would change the output but that needle does not implement: a
# request that sets one (to anything but the value given here, which means "off") gets a 400 naming it.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "best_of": (None, 1), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "prediction": (None,), "web_search_options": (None,), "modalities": (None, ["text"]),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "prompt_logprobs": (None,),
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class JSONSchemaFormat(_Lenient):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def structured(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema",
                              param="response_format")
        return StructuredOutputsParams(json=self.json_schema.schema_)


class StreamOptions(_Lenient):
    include_usage: bool = False


class AttentionField(_Lenient):
    """needle's extension: pick dense or sparse attention, and the sparse budget, per request."""

    mode: str | None = None
    token_budget: int | None = None


class _GenerationRequest(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    attention: AttentionField | None = None
    speculative: bool = True  # needle's extension: false opts this request out of speculative decoding
    response_format: ResponseFormat | None = None

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_FIELDS and value not in UNSUPPORTED_FIELDS[name]:
                hint = {"prompt_logprobs": " (on /v1/completions, echo with logprobs returns them)"}.get(
                    name, " (use response_format)" if name.startswith(("guided_", "structured")) else "")
                raise bad_request(f"{name} is not supported by this server{hint}", param=name)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        return None if self.response_format is None else self.response_format.structured()

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, *,
                        prompt_logprobs: int | None = None, structured: StructuredOutputsParams | None = None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Build the engine's SamplingParams; any invalid value becomes a 400 naming the field. What the
        request leaves unset comes from `defaults` (--generation-config) where it names it."""
        fields: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
        }
        defaults = dict(defaults or {})
        default_max_tokens = defaults.pop("max_tokens", None)
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        kwargs = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
        if kwargs.get("top_k") == 0:
            kwargs["top_k"] = -1  # OpenAI-style clients send 0 for "off"
        try:
            return SamplingParams(
                n=self.n, seed=self.seed, max_tokens=max_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                logit_bias=_logit_bias(self.logit_bias), skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                attention=None if self.attention is None else AttentionOverride(
                    mode=self.attention.mode, token_budget=self.attention.token_budget),
                speculative=self.speculative, structured_outputs=structured, **kwargs)
        except ValueError as err:
            message = str(err)
            name = message.split(" ", 1)[0]
            raise bad_request(message, param=name if name in _PARAM_NAMES else None) from err


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        bias[int(key)] = value
    return bias


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(_Lenient):
    # OpenAI's roles; "developer" is its newer name for "system". Anything else would be written into
    # the chat template as given.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template_fields(self) -> dict[str, Any]:
        """What a tool-aware chat template reads besides role and content; the calls' `arguments`
        (JSON text on the wire) as objects, as templates index them."""
        fields: dict[str, Any] = {}
        if self.tool_calls:
            fields["tool_calls"] = [_with_parsed_arguments(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            fields["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            fields["name"] = self.name
        return fields

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """Plain text of the message; only text content parts exist for a text-only model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise bad_request(f"unsupported content part type {part.get('type')!r}; only 'text' is "
                                  "supported", param="messages")
            if not isinstance(part.get("text"), str):
                raise bad_request("a content part of type 'text' needs a string 'text' field",
                                  param="messages")
            parts.append(part["text"])
        return "".join(parts)


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise bad_request(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                              param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


# Responses.


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # only the keys that changed: role on the first chunk, then content or tool_calls
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
