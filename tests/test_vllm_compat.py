"""Where needle meets what vLLM's users already run: router metrics under vLLM's names, request ids,
the dummy model over HTTP, `needle --version` (issue 17)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import SMALL, LiveServer, error_of, parse_metrics

from needle.server.metrics import Metrics

COMPAT = [*SMALL, "--metrics-compat", "vllm"]
# What the routers read, by the exact sample names they look for (production-stack's engine_stats.py
# reads the `_total` samples of the prefix-cache counters).
ROUTER_GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"]
ROUTER_COUNTERS = ["vllm:gpu_prefix_cache_hits", "vllm:gpu_prefix_cache_queries", "vllm:prefix_cache_hits",
                   "vllm:prefix_cache_queries"]


@pytest.fixture(scope="module")
def compat(serve) -> LiveServer:
    return serve(*COMPAT)


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_metrics_compat_vllm_serves_both_name_sets(compat: LiveServer) -> None:
    prompt = "The same long system prompt, shared by both requests so that the prefix cache hits. " * 4
    for _ in range(2):
        r = httpx.post(f"{compat.url}/v1/completions", headers=compat.headers, timeout=120,
                       json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
    text = httpx.get(f"{compat.url}/metrics", timeout=30).text
    types, m = families(text), parse_metrics(text)
    for name in ROUTER_GAUGES:
        assert types[name] == "gauge", name
    for name in ROUTER_COUNTERS:
        assert types[name] == "counter", name
    # Each vLLM name carries the same number as needle's.
    assert m[("vllm:num_requests_waiting", ())] == m[("needle:num_requests_waiting", ())]
    assert m[("vllm:kv_cache_usage_perc", ())] == m[("vllm:gpu_cache_usage_perc", ())] \
        == m[("needle:kv_cache_usage_perc", ())]
    hits = m[("needle:prefix_cache_hits_total", ())]
    assert hits > 0
    assert m[("vllm:gpu_prefix_cache_hits_total", ())] == m[("vllm:prefix_cache_hits_total", ())] == hits
    assert m[("vllm:gpu_prefix_cache_queries_total", ())] == m[("needle:prefix_cache_queries_total", ())]
    # cache_config_info: a gauge at 1 whose labels size the KV cache, under both prefixes.
    infos = {(name, labels) for name, labels in m if name.endswith(":cache_config_info")}
    assert {name for name, _ in infos} == {"vllm:cache_config_info", "needle:cache_config_info"}
    for name, labels in infos:
        assert m[(name, labels)] == 1
        assert dict(labels)["block_size"] == "16" and int(dict(labels)["num_gpu_blocks"]) > 0
    # vLLM's LoRA gauge, which the endpoint picker looks for: no adapters here.
    assert m[("vllm:lora_requests_info", (("max_lora", "0"), ("running_lora_adapters", ""),
                                          ("waiting_lora_adapters", "")))] > 0
    # Histograms stay needle's only: one name per number where nobody reads vLLM's.
    assert "vllm:time_to_first_token_seconds" not in types


def test_without_compat_only_needle_names_and_cache_info() -> None:
    metrics = Metrics("m", cache_info={"block_size": 16, "num_gpu_blocks": 100})
    text = metrics.exposition().decode()
    assert not [name for name in families(text) if name.startswith("vllm:")]
    info = ("needle:cache_config_info", (("block_size", "16"), ("num_gpu_blocks", "100")))
    assert parse_metrics(text)[info] == 1
    with pytest.raises(ValueError, match="metrics-compat"):
        Metrics("m", compat="sglang")


def test_every_response_carries_a_request_id(compat: LiveServer) -> None:
    mine = httpx.get(f"{compat.url}/v1/models", headers={**compat.headers, "x-request-id": "trace-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
    fresh = [httpx.get(f"{compat.url}/health").headers["x-request-id"] for _ in range(2)]
    assert fresh[0] != fresh[1] and all(len(r) == 32 for r in fresh)
    denied = httpx.get(f"{compat.url}/v1/models", headers={"x-request-id": "no-key"})  # 401 too
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "no-key"
    traced = {**compat.headers, "x-request-id": "s-1"}
    with httpx.stream("POST", f"{compat.url}/v1/completions", headers=traced,
                      json={"prompt": "Hi", "max_tokens": 2, "stream": True}, timeout=60) as r:
        assert r.headers["x-request-id"] == "s-1" and "[DONE]" in r.read().decode()


def test_the_ready_line_and_the_load_bar_say_what_a_person_needs(compat: LiveServer) -> None:
    log = compat.log.read_text()
    ready = next(line for line in log.splitlines() if "needle ready" in line)
    for part in ("max model length 1024", "float32 pages", "sequences at full length",
                 "head profile none (dense)", "prefix caching on"):
        assert part in ready, ready
    assert "tensor" in log and "row/s" not in log  # the load bar counts tensors


def test_dummy_model_over_http_takes_token_ids_and_refuses_text(serve) -> None:
    server = serve("smollm2-135m", "--load-format", "dummy", *SMALL)
    url, headers = server.url, server.headers
    ok = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                    json={"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3
    for path, body in (("/v1/completions", {"prompt": "Hello", "max_tokens": 3}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/tokenize", {"prompt": "Hello"})):
        err = error_of(httpx.post(f"{url}{path}", headers=headers, json=body, timeout=60), 400)
        assert "no tokenizer" in err["message"] and "token ids" in err["message"], err


def test_needle_version() -> None:
    out = subprocess.run([sys.executable, "-m", "needle.server.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("needle ") and out.split()[1][0].isdigit()
