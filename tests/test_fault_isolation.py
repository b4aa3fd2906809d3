"""Issue 12, item 1: a request cannot fail its batch, and a failing engine leaves nobody hanging.

Validation keeps every sampling number finite and in range; behind it, a sequence whose sampling goes
non-finite anyway fails alone (its siblings in the batch go on), and an engine whose steps keep raising
(a backend whose forward raises, installed with LLMEngine.set_backend) stops with /health 503 and a
clean error for every request it held, running or waiting.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from support import free_port

from needle.engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from needle.server.app import build_app
from needle.server.state import ServerConfig


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(attention="dense", kv_cache_memory="256MiB", max_model_len=1024)


@pytest.mark.parametrize("field,value", [
    ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -1.0), ("temperature", 1e9),
    ("top_p", 0.0), ("top_p", float("nan")), ("min_p", float("inf")), ("presence_penalty", float("inf")),
    ("frequency_penalty", -1e308), ("repetition_penalty", 1e-320), ("repetition_penalty", 1e300),
    ("repetition_penalty", float("nan")), ("logit_bias", {5: float("inf")}), ("logit_bias", {5: 1e300}),
    ("min_tokens", 10), ("stop", ["x"] * 33), ("stop", ["x" * 257]), ("stop_token_ids", list(range(3000))),
])
def test_numeric_fields_must_be_finite_and_in_range(field, value) -> None:
    kwargs = {"max_tokens": 5, field: value}
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def _poisoned(**kw) -> SamplingParams:
    """Params that got past validation (as a future bug might let them): set after construction."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for k, v in kw.items():
        setattr(params, k, v)
    return params


@pytest.mark.parametrize("poison", [
    {"repetition_penalty": 1e-320, "temperature": 0.0},
    {"temperature": float("inf"), "min_tokens": 1, "ignore_eos": False},
    {"temperature": 1.0, "logit_bias": {3: float("nan")}},
])
def test_non_finite_sampling_fails_only_its_own_request(llm: LLM, poison: dict) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True)
    alone = [llm.generate("The sea is", p)[0].outputs[0].token_ids for p in (greedy, sampled)]
    engine = llm.engine
    engine.add_request("good-greedy", "The sea is", greedy)
    engine.add_request("poison", "The sea is", _poisoned(**poison))
    engine.add_request("good-sampled", "The sea is", sampled)
    got: dict[str, list[int]] = {"good-greedy": [], "good-sampled": []}
    errors: dict[str, str | None] = {}
    while engine.has_unfinished():
        for out in engine.step()[0]:
            if out.request_id in got:
                got[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                errors[out.request_id] = out.error
    assert errors["poison"] and "not finite" in errors["poison"]
    assert errors["good-greedy"] is None and errors["good-sampled"] is None
    assert [got["good-greedy"], got["good-sampled"]] == alone
    assert engine.allocator.usage == 0


class FailingBackend:
    """The real backend, except that forward blocks until `gate` opens and then raises."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.gate.wait(timeout=60)
        raise RuntimeError("injected backend fault")


def test_engine_stop_fails_running_and_waiting_requests() -> None:
    """Steps that raise are the engine's faults: after three in a row it stops; every request it held
    (running or still waiting) gets a clean error, and /health answers 503."""
    args = EngineArgs(attention="dense", kv_cache_memory="256MiB", max_model_len=1024, max_num_seqs=1)
    backends: list[FailingBackend] = []

    def factory(listener):
        engine = AsyncEngine(args, stats_listener=listener)
        backends.append(FailingBackend(engine.engine.backend))
        engine.engine.set_backend(backends[0])
        return engine

    port = free_port()
    app = build_app(ServerConfig(port=port), args, engine_factory=factory)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with httpx.Client() as c:
                try:
                    if c.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        results = asyncio.run(_send_while_blocked(url, backends))
        for kind, status, body in results:
            if kind == "stream" and status == 200:
                events = [b for b in body.split("\n\n") if b]
                assert events[-1] == "data: [DONE]", body
                assert "error" in json.loads(events[-2][len("data: "):]), body
            else:
                assert status in (500, 503), (kind, status, body)
                assert json.loads(body)["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["message"]
    finally:
        if backends:
            backends[0].gate.set()
        server.should_exit = True
        thread.join(timeout=30)


async def _send_while_blocked(url: str, backends: list[FailingBackend]) -> list[tuple[str, int, str]]:
    """Ten requests, sent while the first step is blocked inside forward, so that most of them are
    waiting when the faults come; none may hang."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i: int) -> tuple[str, int, str]:
            body = {"prompt": f"Request {i} says", "max_tokens": 4}
            if i % 2:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return "stream", r.status_code, (await r.aread()).decode()
            r = await client.post("/v1/completions", json=body)
            return "plain", r.status_code, r.text

        first = asyncio.create_task(one(0))
        for _ in range(200):
            if backends and backends[0].calls:
                break
            await asyncio.sleep(0.05)
        rest = [asyncio.create_task(one(i)) for i in range(1, 10)]
        await asyncio.sleep(1.0)
        backends[0].gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), timeout=60)
