"""Issue 12, item 7: SIGTERM drains. New requests get 503, running ones get --shutdown-timeout to
finish, the rest end with an error event and [DONE], and the process exits 0; a second signal exits
at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from support import REPO, SMALL, LiveServer, _wait_healthy, free_port


def start(*flags: str) -> tuple[subprocess.Popen, LiveServer]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="needle-drain-", suffix=".log")[1])
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "needle.server.cli", "serve", "--port", str(port),
                                 "--api-key", "k", *SMALL, *flags], cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, "NEEDLE_API_KEY": ""})
    server = LiveServer(f"http://127.0.0.1:{port}", "k", log)
    _wait_healthy(server, proc, 300)
    return proc, server


def events_of(text: str) -> list:
    return [b[len("data: "):] if b == "data: [DONE]" else json.loads(b[len("data: "):])
            for b in text.split("\n\n") if b]


async def streams_then_signal(server: LiveServer, proc: subprocess.Popen, signals: int) -> dict:
    """Four long streams, one long prefill and one short stream; SIGTERM once they have all started."""
    bodies = [{"prompt": f"Story {i}:", "max_tokens": 900, "ignore_eos": True} for i in range(4)]
    bodies.append({"prompt": "word " * 700, "max_tokens": 200, "ignore_eos": True})
    bodies.append({"prompt": "Short:", "max_tokens": 3, "ignore_eos": True})
    started = asyncio.Event()
    count = [0]
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        async def stream(body: dict) -> str:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                text = ""
                async for chunk in r.aiter_text():
                    if not text:
                        count[0] += 1
                        if count[0] == len(bodies):
                            started.set()
                    text += chunk
                return text

        tasks = [asyncio.create_task(stream(b)) for b in bodies]
        await asyncio.wait_for(started.wait(), 120)
        sent = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
        late = None
        if signals == 1:
            late = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
            health = await client.get("/health")
        texts = await asyncio.gather(*tasks, return_exceptions=True)
        return {"texts": texts, "late": late, "health": health if late else None, "sent": sent}


def test_sigterm_drains_and_exits_zero() -> None:
    proc, server = start("--shutdown-timeout", "2")
    try:
        out = asyncio.run(streams_then_signal(server, proc, signals=1))
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - out["sent"]
        assert code == 0, server.log.read_text()
        late = out["late"]
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
        assert out["health"].status_code == 503
        for text in out["texts"]:
            events = events_of(text)
            assert events[-1] == "[DONE]", text[-500:]
        endings = [events_of(t)[-2] for t in out["texts"]]
        assert all("error" in e and e["error"]["code"] == "server_shutting_down" for e in endings[:5])
        assert endings[5]["choices"][0]["finish_reason"] == "length"
        assert elapsed < 20
    finally:
        if proc.poll() is None:
            proc.kill()
        server.log.unlink(missing_ok=True)


def test_second_signal_exits_at_once() -> None:
    proc, server = start("--shutdown-timeout", "60")
    try:
        out = asyncio.run(streams_then_signal(server, proc, signals=2))
        code = proc.wait(timeout=20)
        assert code != 0 and time.monotonic() - out["sent"] < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        server.log.unlink(missing_ok=True)
