"""The periodic throughput line vLLM users read in their logs ("Avg prompt throughput ..."), every
NEEDLE_LOG_STATS_INTERVAL seconds (default 10, vLLM's) while the engine steps; --disable-log-stats
turns it off. Runs on the engine thread, from the step listener."""

from __future__ import annotations

import logging
import os
import time

from needle.engine.stats import StepStats

logger = logging.getLogger("needle.stats")


class StatsLog:
    def __init__(self, interval: float | None = None):
        self.interval = interval if interval is not None else float(
            os.environ.get("NEEDLE_LOG_STATS_INTERVAL", "10"))
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.prompt_tokens = self.generation_tokens = self.prefix_queries = self.prefix_hits = 0

    def on_step(self, stats: StepStats) -> None:
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.prefix_queries += stats.prefix_cache_queries
        self.prefix_hits += stats.prefix_cache_hits
        now = time.monotonic()
        elapsed = now - self.since
        if elapsed < self.interval:
            return
        hit_rate = self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d seqs, Waiting: %d seqs, KV cache usage: %.1f%%, Prefix cache hit rate: "
                    "%.1f%%", self.prompt_tokens / elapsed, self.generation_tokens / elapsed,
                    stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage, 100 * hit_rate)
        self._reset(now)
