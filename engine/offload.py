"""Value offload, the engine's side (--cpu-kv-cache-memory): what it refuses, how the two tiers are
sized, and where each running sequence's values sit before a step runs."""

from __future__ import annotations

import logging

import torch

from needle.attention.head_profile import HeadProfile
from needle.attention.offload import OffloadSparseBackend
from needle.attention.sparse import SparseConfig
from needle.engine.config import EngineArgs
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.value_tiers import TierSizes, ValueTiers, plan_sizes
from needle.scheduler.sequence import Sequence

log = logging.getLogger("needle.engine")


def offload_refusal(args: EngineArgs, windowed: bool) -> str | None:
    """Why value offload cannot run with these settings, or None."""
    if args.attention != "sparse":
        return ("--cpu-kv-cache-memory offloads what sparse attention does not read: it needs "
                "--attention sparse")
    if args.speculative_config:
        return "--cpu-kv-cache-memory cannot be combined with --speculative-config yet"
    if windowed:
        return "--cpu-kv-cache-memory does not support sliding-window models yet"
    return None


def build_tiers(spec: KVCacheSpec, args: EngineArgs, config: SparseConfig, profile: HeadProfile, group: int,
                device: torch.device, device_bytes: int, max_model_len: int) -> tuple[KVPool, ValueTiers]:
    """The device pool with value slots in the sparse layers, and the host tier behind it.

    Resident slots cover one prompt of --max-model-len being prefilled plus, per sequence, what a decode
    step reads from resident pages (or its whole context while it fits the budget and runs dense). The
    value cache of each layer holds, for --max-num-seqs sequences, each of its retrieval heads' budget:
    one step's selections always fit, and the slack keeps older ones."""
    ps = spec.page_size
    first = config.dense_layers
    pages = lambda tokens: -(-tokens // ps)  # noqa: E731
    window = pages(max(config.sink_tokens, config.unit_tokens)) + pages(
        max(config.local_tokens, config.retrieval_local_tokens + config.unit_tokens)) + 2
    per_seq = max(window, pages(config.token_budget) + 1)
    selectors = [sum(not s for s in row) * (group if config.per_query_head else 1)  # who picks units
                 for row in profile.streaming[first:]]
    cache = tuple(args.max_num_seqs * n * pages(config.token_budget) for n in selectors)
    sizes = plan_sizes(spec, first, device_bytes, args.cpu_kv_cache_bytes or 0,
                       min_resident=pages(max_model_len) + args.max_num_seqs * per_seq, cache_slots=cache)
    pool = KVPool(spec, sizes.num_pages, device, with_summaries=True,
                  value_slots=[sizes.resident_slots + n for n in cache], offloaded_from=first)
    tiers = ValueTiers(pool, first, sizes)
    log.info("value offload: %s", describe_sizes(sizes, ps, tiers.pin_seconds))
    return pool, tiers


def describe_sizes(sizes: TierSizes, page_size: int, pin_seconds: float) -> str:
    return (f"keys for {sizes.num_pages * page_size} tokens, device values for "
            f"{sizes.resident_slots * page_size} tokens + value caches of up to "
            f"{max(sizes.cache_slots, default=0) * page_size} tokens per layer, host values for "
            f"{sizes.host_pages * page_size} tokens (allocated in {pin_seconds:.1f} s)")


def place_values(tiers: ValueTiers, backend: OffloadSparseBackend, running: list[Sequence],
                 attention_of) -> None:
    """Before a step: every page a running sequence reads in full stays (or comes back) on the device;
    the pages a sparse decode reads only through its selection go to the host."""
    resident: set[int] = set()
    spill: list[int] = []
    for seq in running:
        table = seq.pages.page_table
        span = backend.resident_span(seq.num_computed + 1, *attention_of(seq)) if seq.is_decoding else None
        if span is None:
            resident.update(table)
            continue
        head, first = span
        resident.update(table[:head])
        resident.update(table[first:])
        spill.extend(table[head:first])
    tiers.place(resident, spill)
