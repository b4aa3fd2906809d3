"""Engine-side counters, handed to a listener after every step (the server turns them into Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass, field

from needle.attention.base import AttentionStats
from needle.engine.spec_decode.decoder import SpecStats
from needle.kvcache.value_tiers import TierStats


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
    attention: AttentionStats = field(default_factory=AttentionStats)  # sparse telemetry
    spec: SpecStats | None = None  # speculative decoding telemetry (None: speculation is off)
    offload: TierStats | None = None  # value offload telemetry (None: offload is off)
    cpu_kv_cache_usage: float = 0.0  # fraction of the host value tier in use
