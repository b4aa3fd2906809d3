"""Writes needle.json, the Grafana dashboard: `python deploy/grafana/dashboard.py`.

The dashboard is kept as this short description rather than hand-edited JSON; the test suite checks that
needle.json is what this file writes, and evaluates every query against a live server's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("needle.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = '{model_name="$model_name"}'
RATE = "[$__rate_interval]"


def rate(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group}(rate(needle:{metric}{SEL}{RATE}))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate(needle:{histogram}_bucket{SEL}{RATE})))"


def ratio(numerator: str, denominator: str) -> str:
    return f"{rate(numerator)} / {rate(denominator)}"


def mean(histogram: str) -> str:
    return ratio(histogram + "_sum", histogram + "_count")


def quantiles(histogram: str, qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    return [(quantile(q, histogram), f"p{round(q * 100)}") for q in qs] + [(mean(histogram), "mean")]


def heatmap_of(histogram: str) -> list[tuple[str, str]]:
    return [(f"sum by (le) (increase(needle:{histogram}_bucket{SEL}{RATE}))", "{{le}}")]


# (row title, [(panel title, kind, unit, [(expr, legend)], description)])
ROWS = [
    ("Load", [
        ("Requests running and waiting", "timeseries", "short", [
            (f"sum by (instance) (needle:num_requests_running{SEL})", "{{instance}} running"),
            (f"sum by (instance) (needle:num_requests_waiting{SEL})", "{{instance}} waiting")],
         "Sequences in the running batch and in the waiting queue, per replica (the router balances on "
         "these)."),
        ("KV cache usage", "timeseries", "percentunit", [
            (f"needle:kv_cache_usage_perc{SEL}", "{{instance}}")],
         "Fraction of KV-cache pages in use, per replica. Near 100% the scheduler preempts."),
        ("Token throughput", "timeseries", "short", [
            (rate("prompt_tokens_total"), "prompt tokens/s"),
            (rate("generation_tokens_total"), "generated tokens/s")],
         "Prefill tokens computed and tokens generated per second."),
        ("Finished requests by reason", "timeseries", "reqps", [
            (rate("request_success_total", "finished_reason"), "{{finished_reason}}"),
            (rate("request_upload_disconnects_total"), "upload dropped")],
         "Requests finished per second: stop, length or abort; and clients that hung up while still "
         "sending their request."),
        ("Preemptions", "timeseries", "short", [
            (rate("num_preemptions_total"), "preemptions/s")],
         "Requests evicted from the KV cache to be recomputed later."),
        ("Prefix cache hit rate", "timeseries", "percentunit", [
            (ratio("prefix_cache_hits_total", "prefix_cache_queries_total"), "hit rate")],
         "Share of prompt tokens found in the prefix cache."),
        ("KV cache size", "timeseries", "short", [
            (f"needle:cache_config_info{SEL}",
             "{{instance}}: {{num_gpu_blocks}} pages of {{block_size}} tokens")],
         "Each replica's KV cache (cache_config_info, always 1; the size is in its labels)."),
    ]),
    ("Latency", [
        ("Time to first token", "timeseries", "s", quantiles("time_to_first_token_seconds"),
         "From arrival to the first generated token."),
        ("Inter-token latency", "timeseries", "s", quantiles("inter_token_latency_seconds"),
         "Between consecutive generated tokens of one request."),
        ("End-to-end request latency", "timeseries", "s", quantiles("e2e_request_latency_seconds"),
         "From arrival to the last token."),
        ("Queue time", "timeseries", "s", quantiles("request_queue_time_seconds"),
         "From arrival to the first step that schedules the request."),
    ]),
    ("Lengths and batching", [
        ("Prompt length", "heatmap", "short", heatmap_of("request_prompt_tokens"),
         "Prompt tokens per finished request."),
        ("Generation length", "heatmap", "short", heatmap_of("request_generation_tokens"),
         "Generated tokens per finished request."),
        ("Tokens per engine step", "heatmap", "short", heatmap_of("iteration_tokens_total"),
         "Prefill plus decode tokens computed in one scheduler step."),
    ]),
    ("Sparse attention", [
        ("Sparse attention recall", "timeseries", "percentunit",
         quantiles("sparse_attention_recall", (0.1, 0.5)),
         "Share of the dense attention mass the selected pages keep, on sampled decode steps."),
        ("Tokens read per step", "timeseries", "short", quantiles("sparse_tokens_read"),
         "KV tokens a retrieval head reads per sparse decode step."),
        ("Dense fallbacks", "timeseries", "short", [
            (rate("sparse_dense_fallbacks_total"), "fallbacks/s")],
         "Sparse decode steps that attended densely instead (context within the budget)."),
        ("Fidelity guard widenings", "timeseries", "short", [
            (rate("sparse_guard_widenings_total"), "widenings/s")],
         "Sequences whose sampled recall fell below --sparse-min-recall and widened their budget."),
    ]),
    ("Value offload", [
        ("Value-cache hit rate", "timeseries", "percentunit", [
            (ratio("kv_offload_value_cache_hits_total", "kv_offload_value_cache_queries_total"), "hit rate")],
         "Share of the host pages decode steps read (per layer) that the device value cache held."),
        ("Offload copies", "timeseries", "Bps", [
            (rate("kv_offload_host_to_device_bytes_total"), "host -> device"),
            (rate("kv_offload_device_to_host_bytes_total"), "device -> host")],
         "Value bytes copied per second each way (--cpu-kv-cache-memory)."),
        ("Copy time per step", "timeseries", "s", quantiles("kv_offload_copy_seconds"),
         "Host time a step spent issuing value copies and waiting for fetches."),
        ("Host tier usage", "timeseries", "percentunit", [
            (f"needle:cpu_cache_usage_perc{SEL}", "{{instance}}")],
         "Fraction of the host value tier in use, per replica."),
    ]),
    ("Speculative decoding", [
        ("Draft acceptance rate", "timeseries", "percentunit", [
            (ratio("spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total"),
             "accepted / proposed")],
         "Share of proposed draft tokens that verification kept."),
        ("Drafts and accepted tokens", "timeseries", "short", [
            (rate("spec_decode_num_drafts_total"), "drafts/s"),
            (rate("spec_decode_num_draft_tokens_total"), "draft tokens/s"),
            (rate("spec_decode_num_accepted_tokens_total"), "accepted tokens/s")],
         "Sequence-steps that verified drafts, draft tokens proposed and accepted, per second."),
        ("Accepted by draft position", "timeseries", "short", [
            (rate("spec_decode_num_accepted_tokens_per_pos_total", "position"), "position {{position}}")],
         "Accepted draft tokens per second at each position of the draft."),
        ("Chosen draft length k", "timeseries", "short", quantiles("spec_decode_draft_length"),
         "The draft length the goodput controller picked per step (0: no speculation)."),
        ("Step time: measured vs predicted", "timeseries", "s", [
            (mean("spec_decode_step_seconds"), "measured"),
            (mean("spec_decode_step_predicted_seconds"), "predicted")],
         "Mean engine step time and what the fitted step-time model predicted for the same steps."),
        ("Step-time model error", "timeseries", "percentunit", [
            (f"needle:spec_decode_step_model_error{SEL}", "{{instance}}")],
         "Mean relative error of the step-time model over its window."),
    ]),
]


# Rows of optional mechanisms appear only where the server reports the mechanism on: each repeats over
# a hidden variable listing the model when its needle:FEATURE_info gauge exists, and none otherwise.
FEATURE_OF_ROW = {"Sparse attention": "sparse_attention", "Value offload": "kv_offload",
                  "Speculative decoding": "speculative_decoding"}


def feature_variable(feature: str) -> dict:
    definition = f"label_values(needle:{feature}_info{SEL}, model_name)"
    return {"name": feature, "label": feature, "type": "query", "datasource": DATASOURCE,
            "query": {"query": definition, "refId": feature}, "definition": definition,
            "current": {}, "hide": 2, "refresh": 2, "multi": True, "includeAll": False}


def panel(pid: int, title: str, kind: str, unit: str, queries, description: str, x: int, y: int) -> dict:
    targets = [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
               for i, (expr, legend) in enumerate(queries)]
    p = {"id": pid, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
         "gridPos": {"h": 8, "w": 8, "x": x, "y": y}, "targets": targets,
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}
    if kind == "heatmap":
        for t in targets:
            t["format"] = "heatmap"
        p["options"] = {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1,
                        "color": {"mode": "scheme", "scheme": "Oranges"}}
    else:
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}
    return p


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        row_panel = {"id": pid, "type": "row", "title": row_title, "collapsed": False,
                     "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
        if row_title in FEATURE_OF_ROW:
            row_panel["repeat"] = FEATURE_OF_ROW[row_title]
        panels.append(row_panel)
        pid, y = pid + 1, y + 1
        for i, (title, kind, unit, queries, description) in enumerate(row):
            x, dy = (i % 3) * 8, (i // 3) * 8
            panels.append(panel(pid, title, kind, unit, queries, description, x=x, y=y + dy))
            pid += 1
        y += 8 * ((len(row) + 2) // 3)
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "model_name", "label": "Model", "type": "query", "datasource": DATASOURCE,
         "query": {"query": "label_values(needle:num_requests_running, model_name)", "refId": "model_name"},
         "definition": "label_values(needle:num_requests_running, model_name)",
         "current": {}, "hide": 0, "refresh": 2, "multi": False, "includeAll": False, "sort": 1},
        *(feature_variable(f) for f in FEATURE_OF_ROW.values()),
    ]
    return {
        "uid": "needle", "title": "needle", "tags": ["needle", "llm"], "editable": True,
        "description": "needle inference server: load, latency, lengths, sparse attention, speculation.",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "timezone": "", "graphTooltip": 1, "annotations": {"list": []}, "links": [],
        "templating": {"list": variables}, "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
