"""`--speculative-config`: the JSON vLLM users write, read once into one dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "self_sparse", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # K: the most drafts per sequence and step
    prompt_lookup_min: int = 1  # ngram
    prompt_lookup_max: int = 4
    model: str | None = None  # draft_model: a model with the target's tokenizer ("bundled": SmolLM2)
    load_format: str = "auto"  # draft_model: auto, or dummy (random weights of a configs/ shape)
    draft_token_budget: int = 512  # self_sparse: the draft's sparse budget
    dynamic: bool = True  # choose k in 0..K each step by goodput; False: always K
    draft_kv_cache_memory: str = "256MiB"  # draft_model: its own pool

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative method "draft_model" needs "model": a path')
        if self.draft_token_budget < 16:
            raise ValueError(f"draft_token_budget must be >= 16, got {self.draft_token_budget}")

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        data = json.loads(value) if isinstance(value, str) else dict(value)
        if data.get("method") == "draft_model" or ("model" in data and "method" not in data):
            data["method"] = "draft_model"
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown --speculative-config keys: {', '.join(sorted(unknown))}")
        return cls(**data)
