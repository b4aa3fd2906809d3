"""vLLM's flags where they mean something here: aliases, names, and the ones refused with a reason."""

from __future__ import annotations

import json
import ssl
import subprocess

import httpx
import openai
import pytest
from support import SMALL, error_of

from needle.engine import LLM
from needle.engine.config import EngineArgs
from needle.engine.generation_defaults import generation_defaults
from needle.engine.loader import ModelLoadError
from needle.server.cli import build_parser, main, parse_origins


def test_block_size_is_page_size_and_chunked_prefill_is_always_on():
    ns = build_parser().parse_args(["serve", "--block-size", "32", "--enable-chunked-prefill"])
    args = EngineArgs.from_cli_args(ns)
    assert args.page_size == 32 and args.enable_chunked_prefill
    with pytest.raises(ValueError, match="always prefills in chunks"):
        EngineArgs.from_cli_args(build_parser().parse_args(["serve", "--no-enable-chunked-prefill"]))


def test_several_served_model_names(serve):
    server = serve(*SMALL, "--served-model-name", "needle-small", "gpt-4o-mini")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["needle-small", "gpt-4o-mini"]
    for name in ("needle-small", "gpt-4o-mini"):
        r = client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
        assert r.model == "needle-small" and r.usage.completion_tokens == 2
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=30,
                   json={"model": "other", "prompt": "Hi", "max_tokens": 2})
    assert error_of(r, 404)["param"] == "model"


# -- the rest of vLLM's serving flags -------------------------------------------------------------------

ORIGIN = "https://app.example"
TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


@pytest.fixture(scope="module")
def generation_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5,
                                                               "do_sample": True}))
    return folder


@pytest.fixture(scope="module")
def flagged(serve, model_dir, generation_dir):
    """One server with the request-shaping flags, and its stats line every step."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NEEDLE_LOG_STATS_INTERVAL", "0")
        return serve(*SMALL, "--root-path", "/needle", "--allowed-origins", json.dumps([ORIGIN]),
                     "--chat-template", TEMPLATE, "--tokenizer", str(model_dir),
                     "--generation-config", str(generation_dir), "--max-logprobs", "3")


def test_generation_config_sets_the_defaults_a_request_leaves_unset(flagged):
    client = openai.OpenAI(base_url=f"{flagged.url}/v1", api_key=flagged.api_key, max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    model = client.models.list().data[0].id
    first, again = (client.chat.completions.create(model=model, messages=messages) for _ in range(2))
    assert first.usage.completion_tokens == 5 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == again.choices[0].message.content  # temperature 0
    longer = client.chat.completions.create(model=first.model, messages=messages, max_tokens=7)
    assert longer.usage.completion_tokens == 7


def test_generation_config_values(model_dir, generation_dir, tmp_path):
    assert generation_defaults("vllm", generation_dir) == {}
    assert generation_defaults("auto", model_dir) == {}  # the bundled GGUF carries none
    assert generation_defaults(str(generation_dir), model_dir) == {"temperature": 0.0, "max_tokens": 5}
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        generation_defaults(str(tmp_path), model_dir)


def test_chat_template_and_tokenizer_flags(flagged):
    r = httpx.post(f"{flagged.url}/tokenize", headers=flagged.headers, timeout=30,
                   json={"messages": [{"role": "user", "content": "Hello"}]})
    text = httpx.post(f"{flagged.url}/detokenize", headers=flagged.headers, timeout=30,
                      json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text == "[user] Hello\n[assistant] "


def test_max_logprobs_flag(flagged):
    r = httpx.post(f"{flagged.url}/v1/completions", headers=flagged.headers, timeout=30,
                   json={"prompt": "Hi", "max_tokens": 1, "logprobs": 4})
    assert error_of(r, 400)["param"] == "logprobs"


def test_root_path_and_cors(flagged):
    assert httpx.get(f"{flagged.url}/openapi.json", headers=flagged.headers).json()["servers"] == [
        {"url": "/needle"}]
    assert httpx.get(f"{flagged.url}/v1/models", headers=flagged.headers).status_code == 200
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{flagged.url}/v1/completions", headers=preflight)  # no API key: browsers send none
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{flagged.url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{flagged.url}/v1/models", headers={**flagged.headers, "Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert parse_origins("https://a.example, https://b.example") == ("https://a.example", "https://b.example")


def test_request_and_stats_log_lines(flagged, serve):
    httpx.post(f"{flagged.url}/v1/completions", headers=flagged.headers, timeout=30,
               json={"prompt": "Hi", "max_tokens": 2})
    log = flagged.log.read_text()
    assert "request cmpl-" in log and "1 prompt(s), " in log
    assert "Avg prompt throughput" in log and "Prefix cache hit rate" in log
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NEEDLE_LOG_STATS_INTERVAL", "0")
        quiet = serve(*SMALL, "--disable-log-requests", "--disable-log-stats")
    httpx.post(f"{quiet.url}/v1/completions", headers=quiet.headers, timeout=30,
               json={"prompt": "Hi", "max_tokens": 2}).raise_for_status()
    log = quiet.log.read_text()
    assert "request cmpl-" not in log and "Avg prompt throughput" not in log


def test_https_with_a_self_signed_certificate(serve, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    server = serve(*SMALL, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    assert server.url.startswith("https://")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0,
                           http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))))
    r = client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens == 2
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https", "http") + "/health", timeout=5)


@pytest.mark.parametrize(("argv", "message"), [
    (["--ssl-keyfile", "key.pem"], "go together"),
    (["--ssl-keyfile", "/no/key.pem", "--ssl-certfile", "/no/cert.pem"], "no such file"),
    (["--chat-template", "/no/template.jinja"], "neither a file nor a Jinja template"),
])
def test_flags_that_cannot_be_honoured_exit_with_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["serve", *argv])


def test_engine_flags_refused_with_a_reason():
    with pytest.raises(ModelLoadError, match="--tokenizer /no/such/tokenizer"):
        LLM(tokenizer="/no/such/tokenizer", device="cpu")
