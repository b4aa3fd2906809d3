"""Per-request sampling settings, validated when built so the hot path can trust them.

Every number must be finite and within a range where the sampler's arithmetic stays finite (JSON's
`1e999` reads as infinity, `1e-320` as a subnormal): the ranges are OpenAI's and vLLM's, with bounds
added where they set none (temperature, repetition_penalty, the stop lists). They live in scheduler/,
the lowest layer that holds them (each Sequence carries its request's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
MAX_TOKEN_LIST = 2048  # stop_token_ids and logit_bias entries
MAX_TOKEN_BUDGET = 2**31 - 1


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """Finite and in [low, high] (or (low, high]); NaN fails every comparison, so it fails here too."""
    inside = (low < value if low_open else low <= value) and value <= high
    if not (inside and math.isfinite(value)):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {value}")


@dataclass
class AttentionOverride:
    """Per-request attention mode: None fields fall back to the engine's defaults."""

    mode: str | None = None  # "dense" | "sparse"
    token_budget: int | None = None

    def validate(self) -> None:
        if self.mode is not None and self.mode not in ("dense", "sparse"):
            raise ValueError(f"attention.mode must be 'dense' or 'sparse', got {self.mode!r}")
        if self.token_budget is not None and not 16 <= self.token_budget <= MAX_TOKEN_BUDGET:
            raise ValueError(f"attention.token_budget must be in [16, {MAX_TOKEN_BUDGET}], "
                             f"got {self.token_budget}")


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's names): `json`, a JSON schema (dict or JSON text), or
    `json_object`, any JSON object. The sampler masks every token the grammar does not allow."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if (self.json is None) == (not self.json_object):
            raise ValueError("structured_outputs takes exactly one of json (a schema) or json_object")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as err:
                raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")

    @property
    def schema_text(self) -> str:
        """The schema as JSON text, its keys in their order (a schema's property order is the output's)."""
        return json.dumps(self.json if self.json is not None else {"type": "object"})


@dataclass
class SamplingParams:
    """What vLLM users pass: the same names, the same meaning."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token, computed during the prefill
    logit_bias: dict[int, float] = field(default_factory=dict)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    attention: AttentionOverride | None = None
    speculative: bool = True  # False: never draft for this request (the server's --speculative-config)
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (never speculates)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        if not 1 <= self.n <= 128:
            raise ValueError(f"n must be in [1, 128], got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        if len(self.stop_token_ids) > MAX_TOKEN_LIST:
            raise ValueError(f"stop_token_ids takes at most {MAX_TOKEN_LIST} ids, "
                             f"got {len(self.stop_token_ids)}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check_range("temperature", self.temperature, 0.0, 100.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        # Logits are divided or multiplied by it: tiny or huge values overflow to inf (then NaN).
        _check_range("repetition_penalty", self.repetition_penalty, 0.01, 100.0)
        # The upper bound is the server's --max-logprobs, which engine/validation.py checks.
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if len(self.logit_bias) > MAX_TOKEN_LIST:
            raise ValueError(f"logit_bias takes at most {MAX_TOKEN_LIST} entries, got {len(self.logit_bias)}")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token_id}")
            _check_range("logit_bias", bias, -100.0, 100.0)
        if self.attention is not None:
            self.attention.validate()
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
