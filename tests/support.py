"""What the tests share: a real `needle serve` in a subprocess, the metrics parser, the OpenAI error
check, and the add/step loop over an engine.

Servers start through the CLI (the path users take) on the bundled model with small settings; the
`serve` fixture (conftest.py) keeps one per flag set for the whole session: loading is the slow part.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
SMALL = ["--kv-cache-memory", "256MiB", "--attention", "dense", "--max-model-len", "1024"]


@dataclass
class LiveServer:
    url: str
    api_key: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels without model_name)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that must have `status`."""
    assert r.status_code == status, r.text
    return error_body(r.json())


def error_body(body: dict) -> dict:
    """The `error` object of an OpenAI-shaped error body, checked for its shape."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def run_engine(engine, requests: dict | None = None, on_step=None) -> dict[str, list[int]]:
    """Add requests {id: (prompt, params)} and step the engine until nothing is left, handing each
    step's stats to on_step; -> generated token ids per request id."""
    for rid, (prompt, params) in (requests or {}).items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outputs, stats = engine.step()
        if on_step is not None:
            on_step(stats)
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(*flags: str, load_timeout: float = 300.0) -> Iterator[LiveServer]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="needle-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "needle.server.cli", "serve", "--port", str(port), "--api-key", API_KEY,
           *flags]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "NEEDLE_API_KEY": ""})
    scheme = "https" if "--ssl-certfile" in flags else "http"
    server = LiveServer(f"{scheme}://127.0.0.1:{port}", API_KEY, log)
    try:
        _wait_healthy(server, proc, load_timeout)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


def _wait_healthy(server: LiveServer, proc: subprocess.Popen, timeout: float) -> None:
    with httpx.Client(timeout=5, verify=False) as client:  # readiness only; TLS tests verify their own
        for _ in range(int(timeout / 0.25)):
            if proc.poll() is not None:
                raise RuntimeError(f"needle serve exited with {proc.returncode}:\n{server.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.url}/health").status_code == 200:
                    return
            proc_wait(proc, 0.25)
    raise RuntimeError(f"needle serve did not become healthy:\n{server.log.read_text()}")


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def run_staggered(engine, prompts: list, params, add: int = 2, steps: int = 3) -> dict[str, tuple]:
    """Submit `add` prompts, run `steps` steps, repeat: later prompts join while earlier ones decode, one
    continuous batch with mixed steps; -> {request id: (token ids, per-token logprob dicts)}."""
    got: dict[str, tuple[list, list]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        for _ in range(add):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(str(i), p, params)
        for _ in range(steps):
            for out in engine.step()[0]:
                c = out.outputs[0]
                tokens, logprobs = got.setdefault(out.request_id, ([], []))
                tokens.extend(c.token_ids)
                logprobs.extend(c.logprobs or [])
    return got

