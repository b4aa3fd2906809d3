"""Issue 12's standing tests: what a hostile client sends, in bulk, never hurts an innocent request.

- a hypothesis property test over the sampling fields at their JSON extremes (1e999 reads as
  infinity, subnormals, huge, negative): the answer is 200 or 400, and a concurrent innocent greedy
  request gets exactly its usual answer;
- a poison storm: many poison requests (extreme numbers, surrogates, deep nesting, uploads dropped
  half-way, hang-ups mid-stream) beside normal clients, every one of which answers correctly while
  /health stays 200;
- schemathesis over the server's OpenAPI document (request bodies included), positive and negative
  cases, bounded, asserting no 5xx.

Each prints its figures (sent / 2xx / 4xx / 5xx / stuck) under `pytest -s`.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from support import SMALL, LiveServer

FLAGS = [*SMALL, "--max-model-len", "512", "--max-num-seqs", "16", "--max-queued-seqs", "64",
         "--max-seqs-per-request", "8", "--request-body-timeout", "2"]
INNOCENT = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "n", "max_tokens", "min_tokens", "seed", "logprobs"]
# JSON number literals as a client can write them: the parser turns 1e999 into inf and 1e-400 into 0.
EXTREMES = ["1e999", "-1e999", "1e-320", "5e-324", "-5e-324", "1e308", "-1e308", "0", "-0.0", "1", "-1",
            "0.5", "2", "2.0000001", "100", "100.5", "1e-5", "9223372036854775808", "-9223372036854775809",
            "18446744073709551616", "1" + "0" * 400, "0.01", "0.0099", "true", "\"1\"", "null"]


def figures(name: str, statuses: list[int | None]) -> str:
    counts = collections.Counter("stuck" if s is None else f"{s // 100}xx" for s in statuses)
    line = (f"{name}: sent {len(statuses)} / 2xx {counts['2xx']} / 4xx {counts['4xx']} / "
            f"5xx {counts['5xx']} / stuck {counts['stuck']}")
    print(line)
    return line


@pytest.fixture(scope="module")
def server(serve) -> LiveServer:
    return serve(*FLAGS)


@pytest.fixture(scope="module")
def innocent_answer(server: LiveServer) -> str:
    r = httpx.post(f"{server.url}/v1/completions", json=INNOCENT, headers=server.headers, timeout=60)
    return r.json()["choices"][0]["text"]


def _clamp_work(body: dict) -> dict:
    """Keep generation short on 2 CPU cores without hiding the extremes: valid lengths shrink to 4."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and 4 < value < 10_000:
            body[key] = 4
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4  # chat's default is the whole context
    return body


PROPERTY_STATUSES: list[int | None] = []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(EXTREMES), min_size=1, max_size=4),
       chat=st.booleans(), stream=st.booleans())
def test_sampling_extremes_are_200_or_400_and_spare_the_innocent(
        server: LiveServer, innocent_answer: str, fields: dict, chat: bool, stream: bool) -> None:
    head = ('{"messages": [{"role": "user", "content": "Hi"}]' if chat else '{"prompt": "Hi"')
    numbers = "".join(f', "{k}": {v}' for k, v in fields.items())
    cap = "" if "max_tokens" in fields else ', "max_tokens": 4'
    body = head + numbers + cap + (', "stream": true' if stream else "") + "}"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def run() -> tuple[int | None, str]:
        async with httpx.AsyncClient(base_url=server.url, headers={
                **server.headers, "Content-Type": "application/json"}, timeout=60) as client:
            async def poison() -> int | None:
                try:
                    r = await client.post(path, content=body)
                except httpx.TimeoutException:
                    return None
                if r.status_code == 200 and stream:
                    assert r.text.endswith("data: [DONE]\n\n")
                    assert '"error"' not in r.text, r.text[-400:]
                return r.status_code

            async def innocent() -> str:
                r = await client.post("/v1/completions", json=INNOCENT)
                return r.json()["choices"][0]["text"]

            status, text = await asyncio.gather(poison(), innocent())
            return status, text

    status, text = asyncio.run(run())
    PROPERTY_STATUSES.append(status)
    assert status in (200, 400), (body, status)
    assert text == innocent_answer
    # max_tokens can be huge and valid (up to the context): such a request is fine, just slow.


def test_property_figures() -> None:
    if PROPERTY_STATUSES:
        figures("sampling-extremes property", PROPERTY_STATUSES)
        assert None not in PROPERTY_STATUSES


def _poisons(rng: random.Random) -> list[tuple[str, str | bytes]]:
    """(path, raw body) pairs; 'DROP' and 'HANGUP' are transport-level poisons handled apart."""
    p = [("/v1/completions", '{"prompt": "x", "max_tokens": 2, "repetition_penalty": 1e-320}'),
         ("/v1/completions", '{"prompt": "x", "max_tokens": 2, "temperature": 1e999, "min_tokens": 1}'),
         ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": -1e999}'),
         ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
         ("/v1/chat/completions", '{"messages": [{"role": "\\udfff", "content": "x"}]}'),
         ("/tokenize", '{"prompt": "\\ud800\\ud800"}'),
         ("/v1/completions", "[" * 5000 + "]" * 5000),
         ("/detokenize", '{"tokens": ' + "[" * 3000 + "]" * 3000 + "}"),
         ("/v1/completions", '{"prompt": [[1, 2]], "n": 100}'),
         ("/v1/completions", '{"prompt": "x", "logit_bias": {"5": 1e999}}'),
         ("/v1/completions", '{"prompt": "x", "stop": ["' + "y" * 5000 + '"]}'),
         ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "x"}]}'),
         ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
                                  '"text": 5}]}]}'),
         ("/detokenize", '{"tokens": ["0", true]}'),
         ("/v1/completions", '{"prompt": "x", "max_tokens": 2, "top_p": 1e-320, "temperature": 1e-320}'),
         ("/v1/completions", '{"prompt": [99999999999], "max_tokens": 2}'),
         ("DROP", ""), ("HANGUP", "")]
    return [rng.choice(p) for _ in range(120)]


def test_poison_storm(server: LiveServer, innocent_answer: str) -> None:
    """120 poison requests at concurrency 24 beside 4 normal clients sending 6 requests each."""
    rng = random.Random(12)
    poisons = _poisons(rng)
    host, port = server.url.removeprefix("http://").split(":")

    async def run() -> tuple[list[int | None], list[str], list[int]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120,
                                     limits=limits) as client:
            gate = asyncio.Semaphore(24)
            health: list[int] = []

            async def poison(path: str, body: str) -> int | None:
                async with gate:
                    try:
                        if path == "DROP":  # half an upload, then gone
                            _, w = await asyncio.open_connection(host, int(port))
                            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\nAuthorization: Bearer "
                                    + server.api_key.encode()
                                    + b"\r\nContent-Length: 500\r\n\r\n{\"prompt\": ")
                            await w.drain()
                            w.close()
                            return 499
                        if path == "HANGUP":  # a long stream, dropped after its first event
                            async with client.stream("POST", "/v1/completions", json={
                                    "prompt": "Tell a story", "max_tokens": 200, "stream": True}) as r:
                                async for _ in r.aiter_raw():
                                    break
                            return r.status_code
                        r = await client.post(path, content=body,
                                              headers={"Content-Type": "application/json"})
                        health.append((await client.get("/health")).status_code)
                        return r.status_code
                    except httpx.TimeoutException:
                        return None

            async def normal() -> list[str]:
                texts = []
                for _ in range(6):
                    r = await client.post("/v1/completions", json=INNOCENT)
                    assert r.status_code == 200, r.text
                    texts.append(r.json()["choices"][0]["text"])
                return texts

            results = await asyncio.gather(*(poison(p, b) for p, b in poisons), *(normal() for _ in range(4)))
            return list(results[:len(poisons)]), [t for ts in results[len(poisons):] for t in ts], health

    statuses, texts, health = asyncio.run(run())
    figures("poison storm (poison requests)", statuses)
    assert None not in statuses and not [s for s in statuses if s >= 500]
    assert texts == [innocent_answer] * 24
    assert set(health) == {200}
    assert httpx.get(f"{server.url}/health").status_code == 200
    _wait_idle(server)


def _wait_idle(server: LiveServer) -> None:
    import time

    for _ in range(200):
        m = server.metrics()
        busy = m.get(("needle:num_requests_running", ()), 0) + m.get(("needle:kv_cache_usage_perc", ()), 0)
        if not busy:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not go idle (requests stuck or KV pages leaked)")


@pytest.fixture(scope="module")
def api_schema(server: LiveServer):
    doc = httpx.get(f"{server.url}/openapi.json", headers=server.headers).json()
    return schemathesis.openapi.from_dict(doc)


SCHEMA_STATUSES: list[int | None] = []


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_schemathesis_no_5xx(server: LiveServer, api_schema, path: str, mode: GenerationMode) -> None:
    strategy = api_schema[path]["POST"].as_strategy(generation_mode=mode)

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=strategy)
    def check(case) -> None:
        if isinstance(case.body, dict):
            _clamp_work(case.body)
        try:
            r = case.call(base_url=server.url, headers=server.headers, timeout=60)
        except Exception as err:  # requests' timeout: the server did not answer
            SCHEMA_STATUSES.append(None)
            raise AssertionError(f"no answer to {case.body!r}") from err
        SCHEMA_STATUSES.append(r.status_code)
        assert r.status_code < 500, (case.body, r.status_code, r.text[:500])

    check()


def test_schemathesis_figures(server: LiveServer) -> None:
    if SCHEMA_STATUSES:
        figures("schemathesis", SCHEMA_STATUSES)
    assert httpx.get(f"{server.url}/health").status_code == 200
    _wait_idle(server)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))):  # still accepting connections
        pass
