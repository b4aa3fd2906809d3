"""Prometheus metrics under vLLM's names with the `needle:` prefix, so existing dashboards port over.

With `--metrics-compat vllm` the gauges and counters that routers read are served a second time under
vLLM's own names (`vllm:num_requests_waiting`, ...), because the Gateway API Inference Extension's
endpoint picker and vLLM's production-stack router scrape those exact names. `cache_config_info`
(a gauge fixed at 1 whose labels carry `block_size` and `num_gpu_blocks`, as vLLM serves it) tells a
router the size of the KV cache.

Engine-side numbers arrive as `StepStats` from the engine thread after every step (`on_step`);
request latencies are measured here in the server from the moments a request's outputs arrive
(`RequestTimer`). Each `Metrics` owns its own `CollectorRegistry`: several servers in one process
(tests) never share or collide on collectors.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from needle.engine.stats import StepStats

# A `_created` twin of every counter and histogram doubles the scrape and no dashboard reads it (vLLM
# turns them off too). The switch is process-wide in prometheus_client, so it is thrown once here.
disable_created_metrics()

# Long prompts make first tokens slow: TTFT and e2e buckets reach into minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = tuple(2**i for i in range(0, 21))  # 1 .. 1M tokens
_K_BUCKETS = tuple(range(0, 17))
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
                 5.0, 10.0)
_RECALL_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)

FINISH_REASONS = ("stop", "length", "abort")
METRICS_COMPAT = ("none", "vllm")
# needle's name -> the vLLM names a router reads for the same number (vLLM >= 0.9 names first, then the
# older ones production-stack still reads).
VLLM_ALIASES = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "prefix_cache_queries_total": ("prefix_cache_queries", "gpu_prefix_cache_queries"),
    "prefix_cache_hits_total": ("prefix_cache_hits", "gpu_prefix_cache_hits"),
}


class Fanout:
    """One number exported under several names: set/inc reach every child."""

    def __init__(self, children: list):
        self.children = children

    def set(self, value: float) -> None:
        for child in self.children:
            child.set(value)

    def inc(self, amount: float = 1.0) -> None:
        for child in self.children:
            child.inc(amount)


class Metrics:
    """All collectors of one server, labelled with its served model name."""

    def __init__(self, model_name: str, compat: str = "none", cache_info: dict[str, int] | None = None,
                 features: dict[str, dict[str, str]] | None = None):
        """`compat` "vllm" adds vLLM's names for the router metrics; `cache_info` ({block_size,
        num_gpu_blocks}) becomes `cache_config_info` (under `vllm:` too when compat is vllm); each of
        `features` (those switched on: name -> its settings) becomes a `needle:NAME_info` gauge, which
        the dashboard's rows for that feature appear on."""
        if compat not in METRICS_COMPAT:
            raise ValueError(f"--metrics-compat must be one of {', '.join(METRICS_COMPAT)}, not {compat!r}")
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, label = self.registry, ["model_name"]

        def names(name: str) -> list[str]:
            return [f"needle:{name}"] + [f"vllm:{a}" for a in VLLM_ALIASES.get(name, ()) if compat == "vllm"]

        def gauge(name: str, doc: str) -> Fanout:
            return Fanout([Gauge(n, doc, label, registry=r).labels(model_name) for n in names(name)])

        def counter(name: str, doc: str) -> Fanout:
            return Fanout([Counter(n, doc, label, registry=r).labels(model_name) for n in names(name)])

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"needle:{name}", doc, label, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).")
        self.upload_disconnects = counter("request_upload_disconnects_total",
                                          "Clients that hung up while sending their request body.")
        self.prompt_tokens = counter("prompt_tokens_total", "Prefill tokens computed.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions_total", "Sequences preempted for lack of pages.")
        self.prefix_cache_queries = counter("prefix_cache_queries_total",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits_total",
                                         "Prompt tokens found in the prefix cache.")
        self._success = Counter("needle:request_success_total", "Finished choices by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.request_success = {reason: self._success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Time between successive outputs of a request.", _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Arrival to last token.", _LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Arrival to first scheduled.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Tokens generated per finished request.", _TOKEN_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens processed per engine step.",
                                          _TOKEN_BUCKETS)
        # Sparse attention.
        self.sparse_recall = histogram("sparse_attention_recall",
                                       "Attention mass a sparse step kept, measured on sampled steps.",
                                       _RECALL_BUCKETS)
        self.sparse_tokens_read = histogram("sparse_tokens_read",
                                            "KV tokens one sparse head read in a decode step.",
                                            _TOKEN_BUCKETS)
        self.sparse_dense_fallbacks = counter("sparse_dense_fallbacks_total",
                                              "Sparse decode steps that ran dense (context within budget).")
        self.sparse_guard_widenings = counter("sparse_guard_widenings_total",
                                              "Budgets the fidelity guard widened (sampled recall under "
                                              "--sparse-min-recall).")
        # Value offload (--cpu-kv-cache-memory): the device value cache's lookups of host pages, the bytes
        # copied each way and the host time spent on copies per step.
        self.cpu_cache_usage_perc = gauge("cpu_cache_usage_perc", "Fraction of the host value tier in use.")
        self.value_cache_queries = counter("kv_offload_value_cache_queries_total",
                                           "Host pages a decode step read (per layer), looked up in the "
                                           "device value cache.")
        self.value_cache_hits = counter("kv_offload_value_cache_hits_total",
                                        "Of those, pages found in the cache (no copy).")
        self.offload_to_device = counter("kv_offload_host_to_device_bytes_total",
                                         "Value bytes copied host -> device.")
        self.offload_to_host = counter("kv_offload_device_to_host_bytes_total",
                                       "Value bytes copied device -> host.")
        self.offload_copy_time = histogram("kv_offload_copy_seconds",
                                           "Host time a step spent issuing value copies and waiting for "
                                           "fetches.", _STEP_BUCKETS)
        if cache_info is not None:
            for prefix in ["needle"] + (["vllm"] if compat == "vllm" else []):
                info = {"model_name": model_name, **{k: str(v) for k, v in cache_info.items()}}
                Gauge(f"{prefix}:cache_config_info", "KV-cache configuration (the value is always 1).",
                      sorted(info), registry=r).labels(**info).set(1)
        for name, settings in (features or {}).items():
            labels = {"model_name": model_name, **settings}
            Gauge(f"needle:{name}_info", f"{name.replace('_', ' ')} is on, with these settings (always 1).",
                  sorted(labels), registry=r).labels(**labels).set(1)
        # vLLM's LoRA gauge, which the endpoint picker expects to find: needle serves no adapters.
        self.lora_info = None
        if compat == "vllm":
            self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests (none here).",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                                   registry=r).labels("0", "", "")
            self.lora_info.set_to_current_time()
        # Speculative decoding (vLLM's names), and the goodput controller's view.
        self.spec_drafts = counter("spec_decode_num_drafts_total", "Sequence-steps that verified drafts.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens_total", "Draft tokens proposed.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens_total",
                                            "Draft tokens accepted by verification.")
        self._spec_per_pos = Counter("needle:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted at each draft position.",
                                     ["model_name", "position"], registry=r)
        self.spec_per_pos: dict[int, Counter] = {}
        self.spec_k = histogram("spec_decode_draft_length", "Draft length k the controller chose per step.",
                                _K_BUCKETS)
        self.spec_step_measured = histogram("spec_decode_step_seconds", "Measured engine step time.",
                                            _STEP_BUCKETS)
        self.spec_step_predicted = histogram("spec_decode_step_predicted_seconds",
                                             "The step-time model's prediction for the same steps.",
                                             _STEP_BUCKETS)
        self.spec_fit_error = gauge("spec_decode_step_model_error",
                                    "Mean relative error of the fitted step-time model (0-1).")

    def on_step(self, stats: StepStats) -> None:
        """Engine listener; runs on the engine thread (prometheus_client collectors are thread-safe)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if step_tokens:
            self.iteration_tokens.observe(step_tokens)
        for recall in stats.attention.recall_samples:
            self.sparse_recall.observe(recall)
        if stats.offload is not None:
            self.cpu_cache_usage_perc.set(stats.cpu_kv_cache_usage)
            self.value_cache_queries.inc(stats.offload.hits + stats.offload.misses)
            self.value_cache_hits.inc(stats.offload.hits)
            self.offload_to_device.inc(stats.offload.bytes_to_device)
            self.offload_to_host.inc(stats.offload.bytes_to_host)
            self.offload_copy_time.observe(stats.offload.copy_seconds)
        for tokens in stats.attention.tokens_read:
            self.sparse_tokens_read.observe(tokens)
        self.sparse_dense_fallbacks.inc(stats.attention.dense_fallbacks)
        self.sparse_guard_widenings.inc(stats.attention.guard_widenings)
        if self.lora_info is not None:
            self.lora_info.set_to_current_time()
        if stats.spec is not None:
            self._on_spec(stats.spec)

    def _on_spec(self, spec) -> None:
        self.spec_drafts.inc(spec.num_drafts)
        self.spec_draft_tokens.inc(spec.num_draft_tokens)
        self.spec_accepted_tokens.inc(spec.num_accepted_tokens)
        for pos, n in enumerate(spec.accepted_per_pos):
            counter = self.spec_per_pos.get(pos)
            if counter is None:
                counter = self.spec_per_pos[pos] = self._spec_per_pos.labels(self.model_name, str(pos))
            counter.inc(n)
        if spec.k is not None:
            self.spec_k.observe(spec.k)
        if spec.predicted_s is not None:
            self.spec_step_measured.observe(spec.measured_s)
            self.spec_step_predicted.observe(spec.predicted_s)
        if spec.fit_error == spec.fit_error:  # not NaN: the model has been fitted
            self.spec_fit_error.set(spec.fit_error)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one engine request (one prompt), measured from the moments its outputs arrive."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None

    def on_tokens(self) -> None:
        """Call when an output with new tokens arrives."""
        now = time.monotonic()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.last = now

    def on_finish(self, prompt_tokens: int, generation_tokens: int, finish_reasons: list[str],
                  engine_times: dict[str, float]) -> None:
        m = self.metrics
        m.e2e_request_latency.observe(time.monotonic() - self.arrival)
        m.request_prompt_tokens.observe(prompt_tokens)
        m.request_generation_tokens.observe(generation_tokens)
        arrival, scheduled = engine_times.get("arrival_time"), engine_times.get("first_scheduled_time")
        if arrival is not None and scheduled is not None:
            m.request_queue_time.observe(max(0.0, scheduled - arrival))
        for reason in finish_reasons:
            if reason in m.request_success:
                m.request_success[reason].inc()
