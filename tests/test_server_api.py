"""The live server against the official `openai` client and raw HTTP, on the real bundled model."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SMALL, LiveServer, error_of

# 16 batch slots and 4 queue slots: the concurrency test fits, the queue-full test can overflow it.
FLAGS = [*SMALL, "--max-num-seqs", "16", "--max-queued-requests", "4", "--max-request-bytes", "64KiB"]
ABORTS = ("needle:request_success_total", (("finished_reason", "abort"),))
PROMPTS = [f"The number {i} is" for i in range(16)]


@pytest.fixture(scope="module")
def server(serve) -> LiveServer:
    return serve(*FLAGS)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def chat(client: openai.OpenAI, model: str, text: str, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=0, **kw)


def sse_events(response: httpx.Response) -> list:
    """Every `data:` payload of an SSE body, JSON-decoded except the final [DONE]."""
    events = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def hang_up_while_running(server: LiveServer, body: dict) -> None:
    """Send a non-streaming request on a raw socket and close it once the engine runs the request."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(data)}\r\n\r\n")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + data)
        for _ in range(600):
            if server.metrics()[("needle:num_requests_running", ())] >= 1:
                return
            time.sleep(0.05)
    raise AssertionError("the request never started running")


def wait_for_aborts(server: LiveServer, count: float) -> None:
    """The server notices hang-ups asynchronously; poll until it has counted them."""
    for _ in range(600):
        if server.metrics().get(ABORTS, 0) >= count:
            return
        time.sleep(0.05)
    assert server.metrics().get(ABORTS, 0) >= count


def test_models_version_health(server: LiveServer, client: openai.OpenAI, model: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert httpx.get(f"{server.url}/version", headers=server.headers).json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_length_and_usage(server: LiveServer, client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id and r.created and r.model == model
    assert r.choices[0].finish_reason == "length"
    count = httpx.post(f"{server.url}/tokenize", headers=server.headers,
                       json={"prompt": "The capital of France is"}).json()["count"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (count, 6)
    assert r.usage.total_tokens == count + 6


def test_chat_and_streaming_agree(client: openai.OpenAI, model: str) -> None:
    whole = chat(client, model, "Name three colours.", max_tokens=12)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}], temperature=0,
        max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_completion_stream_raw_sse(server: LiveServer, client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60, json={
        "model": model, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_streaming_never_splits_a_character(client: openai.OpenAI, model: str) -> None:
    prompt = "日本語の文章: 東京は日本の首都です。大阪は"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                      temperature=0).choices[0].text
    deltas = [c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    assert any(ord(ch) > 0x3000 for ch in whole)  # multi-byte characters were generated
    assert all(d and "\ufffd" not in d for d in deltas[:-1])
    assert "".join(deltas) == whole


def test_n_and_seed(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> list[str]:
        r = client.completions.create(model=model, prompt="My favourite animal is", max_tokens=8, n=2,
                                      temperature=1.0, seed=seed)
        assert sorted(c.index for c in r.choices) == [0, 1]
        assert r.usage.completion_tokens <= 16
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert sample(7) == sample(7)


def test_stop_string(client: openai.OpenAI, model: str) -> None:
    free = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text.strip()[2:4]
    assert len(stop) == 2 and stop in text
    stopped = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]


def test_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert sampled <= 0 and 1 <= len(top) <= 2
        assert sampled == pytest.approx(max(top.values()))  # greedy picks the most likely token
    c = chat(client, model, "Hi", max_tokens=3, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content


def test_echo(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Echo this", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Echo this") and len(r.choices[0].text) > len("Echo this")


def test_token_id_prompts_and_tokenize_round_trip(server: LiveServer, client: openai.OpenAI,
                                                  model: str) -> None:
    tok = httpx.post(f"{server.url}/tokenize", headers=server.headers,
                     json={"model": model, "prompt": "The sky is"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 1024
    back = httpx.post(f"{server.url}/detokenize", headers=server.headers, json={"tokens": tok["tokens"]})
    assert back.json() == {"prompt": "The sky is"}
    by_text = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=model, prompt=tok["tokens"], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=model, prompt=[tok["tokens"], tok["tokens"]], max_tokens=5,
                                    temperature=0)
    assert [c.text for c in two.choices] == [by_text.choices[0].text] * 2
    chat_tok = httpx.post(f"{server.url}/tokenize", headers=server.headers,
                          json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] > 1


def test_concurrent_clients_get_their_solo_text(server: LiveServer, client: openai.OpenAI,
                                                model: str) -> None:
    solo = [client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0).choices[0].text
            for p in PROMPTS]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key,
                                      max_retries=0) as aclient:
            rs = await asyncio.gather(*[aclient.completions.create(
                model=model, prompt=p, max_tokens=5, temperature=0) for p in PROMPTS])
        return [r.choices[0].text for r in rs]

    assert asyncio.run(together()) == solo


def test_disconnect_frees_pages_and_server_keeps_serving(server: LiveServer, client: openai.OpenAI,
                                                         model: str) -> None:
    aborts = server.metrics().get(ABORTS, 0)
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, json=body,
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generation has started; now hang up
    wait_for_aborts(server, aborts + 1)
    hang_up_while_running(server, {**body, "stream": False, "max_tokens": 1000})  # non-streaming
    wait_for_aborts(server, aborts + 2)
    after = chat(client, model, "Say hi.", max_tokens=4)
    assert after.choices[0].message.content
    m = server.metrics()
    assert m[("needle:kv_cache_usage_perc", ())] == 0
    assert m[("needle:num_requests_running", ())] == 0


def test_queue_full_gets_503_with_retry_after(server: LiveServer, model: str) -> None:
    body = {"model": model, "prompt": "Go on and on.", "max_tokens": 400, "stream": True}
    aborts = server.metrics().get(ABORTS, 0)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as http:
            streams = []
            try:
                for _ in range(20):  # 16 batch slots + 4 queue slots
                    cm = http.stream("POST", "/v1/completions", json=body)
                    r = await cm.__aenter__()
                    assert r.status_code == 200
                    streams.append(cm)
                return await http.post("/v1/completions", json={**body, "stream": False})
            finally:
                for cm in streams:
                    await cm.__aexit__(None, None, None)

    r = asyncio.run(run())
    wait_for_aborts(server, aborts + 20)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "server_busy"


def test_metrics_move(server: LiveServer, client: openai.OpenAI, model: str) -> None:
    before = server.metrics()
    client.completions.create(model=model, prompt="Metrics test", max_tokens=3, temperature=0)
    after = server.metrics()

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("needle:request_success_total", (("finished_reason", "length"),)) == 1
    assert delta("needle:e2e_request_latency_seconds_count") == 1
    assert delta("needle:time_to_first_token_seconds_count") == 1
    assert delta("needle:inter_token_latency_seconds_count") == 2
    assert delta("needle:request_generation_tokens_sum") == 3
    assert delta("needle:request_queue_time_seconds_count") == 1
    assert delta("needle:generation_tokens_total") >= 3
    assert delta("needle:prompt_tokens_total") >= 1
    assert delta("needle:iteration_tokens_total_count") >= 3


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
ERROR_CASES = [
    # (path, body, status, param)
    (COMPLETIONS, {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"token": 1}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-3]}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    (COMPLETIONS, {"prompt": "x", "n": 129}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "attention": {"mode": "fuzzy"}}, 400, "attention.mode"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"max_tokens": 2}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5000}, 400, "prompt"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/tokenize", {"prompt": "x", "messages": USER}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERROR_CASES,
                         ids=[f"{p}-{json.dumps(b)[:40]}" for p, b, _, _ in ERROR_CASES])
def test_invalid_requests(server: LiveServer, path: str, body: dict, status: int, param: str) -> None:
    r = httpx.post(f"{server.url}{path}", headers=server.headers, json=body, timeout=60)
    err = error_of(r, status)
    assert err["param"] == param, err


def test_transport_level_errors(server: LiveServer) -> None:
    url = f"{server.url}{COMPLETIONS}"
    error_of(httpx.post(url, json={"prompt": "x"}), 401)
    error_of(httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    as_json = {**server.headers, "Content-Type": "application/json"}
    error_of(httpx.post(url, content=b'{"prompt": ', headers=as_json), 400)
    error_of(httpx.post(url, content=b'{"prompt": "x", "temperature": NaN}', headers=as_json), 400)
    error_of(httpx.post(url, json=["not", "an", "object"], headers=server.headers), 400)
    error_of(httpx.post(url, json={"prompt": "x" * 70_000}, headers=server.headers), 413)
    error_of(httpx.get(url, headers=server.headers), 405)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_context_overflow_message(server: LiveServer, model: str) -> None:
    prompt = "hello " * 1100
    tok = httpx.post(f"{server.url}/tokenize", headers=server.headers, json={"prompt": prompt})
    count = tok.json()["count"]
    r = httpx.post(f"{server.url}{COMPLETIONS}", headers=server.headers,
                   json={"model": model, "prompt": prompt, "max_tokens": 7})
    assert error_of(r, 400)["message"] == (
        f"This model's maximum context length is 1024 tokens. However, you requested {count + 7} tokens "
        f"({count} in the messages, 7 in the completion). Please reduce the length of the messages or "
        "completion.")


def test_unknown_fields_are_ignored(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0,
                                  extra_body={"no_such_field": {"deep": [1, 2]}, "best_of": 1})
    assert r.choices[0].text


SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                max_size=3),
                    max_leaves=6)
FIELDS = ["temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "logit_bias", "logprobs",
          "echo", "stream", "stream_options", "attention", "user", "skip_special_tokens", "top_logprobs",
          "include_stop_str_in_output", "max_completion_tokens", "add_generation_prompt"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([COMPLETIONS, CHAT]), extra=st.dictionaries(st.sampled_from(FIELDS), JSON,
                                                                         max_size=4))
def test_no_input_yields_a_server_error(server: LiveServer, path: str, extra: dict) -> None:
    base = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": USER}
    r = httpx.post(f"{server.url}{path}", headers=server.headers, timeout=120,
                   json={**base, **extra, "max_tokens": 2})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        error_of(r, 400)


def test_per_request_attention_override(server: LiveServer, client: openai.OpenAI, model: str) -> None:
    """This server runs dense attention: a dense override is served dense (no sparse telemetry moves),
    a sparse one is refused rather than silently served dense."""
    before = server.metrics()
    r = client.completions.create(model=model, prompt="Hi there", max_tokens=2, temperature=0,
                                  extra_body={"attention": {"mode": "dense"}})
    assert r.usage.completion_tokens == 2
    after = server.metrics()
    for name in ("needle:sparse_dense_fallbacks_total", "needle:sparse_tokens_read_count"):
        assert after[(name, ())] == before[(name, ())]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi there", max_tokens=2,
                                  extra_body={"attention": {"mode": "sparse", "token_budget": 64}})
    assert err.value.body["param"] == "attention.mode" and "dense attention" in err.value.body["message"]


def test_context_length_error_names_the_prompt_field_and_code(server: LiveServer) -> None:
    cases = ((COMPLETIONS, {"prompt": "x"}, "prompt"), (CHAT, {"messages": USER}, "messages"))
    for path, base, param in cases:
        r = httpx.post(f"{server.url}{path}", headers=server.headers, json={**base, "max_tokens": 5000},
                       timeout=60)
        err = error_of(r, 400)
        assert (err["param"], err["code"]) == (param, "context_length_exceeded"), err
        assert err["message"].startswith("This model's maximum context length is 1024 tokens.")
