"""Engine-side counters, handed to a listener after every step (the server turns them into Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    """One scheduler step. Counters are increments for this step; gauges are values after it."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of pages in use, 0..1
    num_prompt_tokens: int = 0  # prefill tokens computed this step
    num_generation_tokens: int = 0  # tokens emitted this step
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    # Attention telemetry (sparse backends fill these; dense leaves them empty).
    sparse_recall_samples: list[float] = field(default_factory=list)
    sparse_tokens_read: list[int] = field(default_factory=list)
    sparse_dense_fallbacks: int = 0
    # Speculative decoding.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
