"""Server pieces that need no model: metrics, request validation, error shapes, the CLI, the
not-yet-loaded server (driven in-process through httpx's ASGI transport, which skips the lifespan,
so the engine never loads)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from support import parse_metrics

from needle.attention.base import AttentionStats
from needle.engine.config import EngineArgs
from needle.engine.stats import StepStats
from needle.engine.validation import ContextLengthError, RequestLimits, validate_request
from needle.scheduler.sampling_params import SamplingParams
from needle.server.app import build_app
from needle.server.cli import build_parser
from needle.server.errors import APIError
from needle.server.metrics import Metrics
from needle.server.protocol import ChatCompletionRequest, CompletionRequest
from needle.server.state import ServerConfig


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return parse_metrics(metrics.exposition().decode())


def test_metrics_follow_engine_steps() -> None:
    m = Metrics("tiny")
    m.on_step(StepStats(num_running=3, num_waiting=1, kv_cache_usage=0.25, num_prompt_tokens=100,
                        num_generation_tokens=3, prefix_cache_queries=64, prefix_cache_hits=32,
                        attention=AttentionStats(recall_samples=[0.97, 0.99], tokens_read=[1024],
                                                 dense_fallbacks=2)))
    m.on_step(StepStats(num_running=0, kv_cache_usage=0.0, num_generation_tokens=2))
    got = samples(m)
    lab = ()
    assert got[("needle:num_requests_running", lab)] == 0
    assert got[("needle:kv_cache_usage_perc", lab)] == 0
    assert got[("needle:prompt_tokens_total", lab)] == 100
    assert got[("needle:generation_tokens_total", lab)] == 5
    assert got[("needle:prefix_cache_hits_total", lab)] == 32
    assert got[("needle:iteration_tokens_total_count", lab)] == 2
    assert got[("needle:sparse_attention_recall_count", lab)] == 2
    assert got[("needle:sparse_tokens_read_sum", lab)] == 1024
    assert got[("needle:sparse_dense_fallbacks_total", lab)] == 2
    assert not any(name.endswith("_created") for name, _ in got)


def test_two_metrics_in_one_process_do_not_collide() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.on_step(StepStats(num_generation_tokens=7))
    assert samples(a)[("needle:generation_tokens_total", ())] == 7
    assert samples(b)[("needle:generation_tokens_total", ())] == 0


def test_context_length_message_is_the_one_clients_parse() -> None:
    limits = RequestLimits(vocab_size=100, max_model_len=2048, kv_capacity_tokens=10**6, attention="dense")
    with pytest.raises(ContextLengthError) as err:
        validate_request([1] * 2000, SamplingParams(max_tokens=100), limits)
    assert err.value.code == "context_length_exceeded"
    assert str(err.value).startswith("This model's maximum context length is 2048 tokens. However, you "
                                  "requested 2100 tokens (2000 in the messages, 100 in the completion).")


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": -1}, "logprobs"),  # the upper bound is --max-logprobs, the engine's check
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"attention": {"mode": "fuzzy"}}, "attention.mode"),
    ({"attention": {"token_budget": 1}}, "attention.token_budget"),
])
def test_invalid_sampling_values_name_their_field(fields: dict, param: str) -> None:
    body = CompletionRequest.model_validate({"prompt": "hi", **fields})
    with pytest.raises(APIError) as info:
        body.sampling_params(body.max_tokens, body.logprobs)
    assert (info.value.status, info.value.param) == (400, param)


def test_chat_logprob_rules() -> None:
    with pytest.raises(APIError, match="requires logprobs"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "top_logprobs": 2}).logprobs_count()
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                 "logprobs": True, "top_logprobs": 3, "whatever": 1})
    assert body.logprobs_count() == 3
    assert body.model_extra == {"whatever": 1}


def test_cli_reads_engine_and_server_flags() -> None:
    ns = build_parser().parse_args(["serve", "some/model", "--port", "9001", "--max-request-bytes", "1KiB",
                                    "--attention", "dense", "--no-enable-prefix-caching"])
    assert (ns.model_positional, ns.port, ns.max_request_bytes) == ("some/model", 9001, 1024)
    args = EngineArgs.from_cli_args(ns)
    assert (args.attention, args.enable_prefix_caching) == ("dense", False)


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _unloaded(**config) -> httpx.AsyncClient:
    return _client(build_app(ServerConfig(**config), EngineArgs()))


def _assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_before_the_model_loads() -> None:
    async def run() -> None:
        async with _unloaded(max_request_bytes=1000) as client:
            _assert_error(await client.get("/health"), 503)
            _assert_error(await client.get("/v1/models"), 503)
            assert (await client.get("/version")).json()["version"]
            assert (await client.get("/metrics")).status_code == 200
            _assert_error(await client.post("/v1/completions", content=b"{not json",
                                            headers={"Content-Type": "application/json"}), 400)
            _assert_error(await client.post("/v1/completions", json=[1, 2]), 400)
            err = _assert_error(await client.post("/v1/completions", json={"prompt": 5.5}), 400)
            assert err["param"].startswith("prompt")
            _assert_error(await client.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
            _assert_error(await client.post("/v1/chat/completions", json={"messages": []}), 400)
            _assert_error(await client.get("/no/such/path"), 404)

    asyncio.run(run())


def test_api_key_guards_all_but_health_and_metrics() -> None:
    async def run() -> None:
        async with _unloaded(api_key="sesame") as client:
            err = _assert_error(await client.get("/v1/models"), 401)
            assert err["code"] == "invalid_api_key"
            _assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            ok = await client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
            assert ok.status_code == 503  # past the key check; the model is not loaded here
            assert (await client.get("/health")).status_code == 503
            assert (await client.get("/metrics")).status_code == 200

    asyncio.run(run())


def test_health_turns_503_when_the_engine_cannot_continue() -> None:
    """The server trusts the engine's `healthy` flag; an engine thread that gave up flips it to False."""
    app = build_app(ServerConfig(), EngineArgs())
    app.state.needle.engine = SimpleNamespace(healthy=False, model_name="m", max_model_len=8)

    async def run() -> None:
        async with _client(app) as client:
            _assert_error(await client.get("/health"), 503)
            _assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503)

    asyncio.run(run())
