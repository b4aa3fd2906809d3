"""Speculation at saturation, through the server: does goodput mode ever cost throughput?

    .venv/bin/python bench/spec_serve.py [--rounds 2] [--requests 32] [--max-tokens 48]

Starts three `needle serve` processes on the bundled model with `--max-num-seqs 32` (no speculation;
ngram with the goodput controller; ngram with a fixed K = 4), then, round after round, sends each the
same load: `--requests` streaming completions, all in flight at once (bench/serve.py's generator), short
prompts. Configurations alternate within a round, so drift on a shared machine hits each alike. Prints
output tokens/s per round and on the mean, the ratio to no speculation, and the drafts accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve import run_level

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"no speculation": [],
           "ngram, goodput": ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'],
           "ngram, fixed K = 4": ["--speculative-config",
                                  '{"method": "ngram", "num_speculative_tokens": 4, "dynamic": false}']}


def start(flags: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tempfile.mkstemp(prefix="needle-spec-serve-", suffix=".log")[1], "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "needle.server.cli", "serve", "--port", str(port),
                             "--max-num-seqs", "32", *flags], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"a server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not become healthy")


def counter(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def measure(ns: argparse.Namespace, urls: dict[str, str]) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))
               for name, url in urls.items()}
    model = (await next(iter(clients.values())).get("/v1/models")).json()["data"][0]["id"]
    for http in clients.values():  # warm-up, not measured
        await run_level(http, model, 4, 4, ns.prompt_words, 8, -100)
    for r in range(ns.rounds):
        for name, http in clients.items():
            level = await run_level(http, model, ns.requests, ns.requests, ns.prompt_words, ns.max_tokens,
                                    1000 * r)
            tokens = sum(s.output_tokens for s in level.samples)
            rates[name].append(tokens / level.wall)
            print(f"round {r + 1} {name}: {rates[name][-1]:.1f} tok/s ({level.failures} failed)", flush=True)
    for name, http in clients.items():
        text = (await http.get("/metrics")).text
        drafted = counter(text, "needle:spec_decode_num_draft_tokens_total")
        accepted = counter(text, "needle:spec_decode_num_accepted_tokens_total")
        rates[name + " acceptance"] = [accepted / drafted if drafted else float("nan"), drafted]
        await http.aclose()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of the load per configuration.")
    ap.add_argument("--requests", type=int, default=32, help="Concurrent requests per round.")
    ap.add_argument("--prompt-words", type=int, default=24, help="Words of filler per prompt (short chats).")
    ap.add_argument("--max-tokens", type=int, default=48, help="Tokens generated per request.")
    ns = ap.parse_args()
    procs, urls = {}, {}
    try:
        for name, flags in CONFIGS.items():
            procs[name], urls[name] = start(flags)
        for name in CONFIGS:
            wait_healthy(urls[name], procs[name])
        rates = asyncio.run(measure(ns, urls))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    base = sum(rates["no speculation"]) / ns.rounds
    threads = os.environ.get("OMP_NUM_THREADS", "all cores")
    print(f"\n{ns.requests} concurrent streaming completions, ~{ns.prompt_words}-word prompts, "
          f"{ns.max_tokens} tokens each, --max-num-seqs 32, {ns.rounds} rounds, threads: {threads}\n")
    print("| configuration | output tok/s per round | mean | vs no speculation | acceptance | drafts |")
    print("|---|---|---|---|---|---|")
    for name in CONFIGS:
        mean = sum(rates[name]) / ns.rounds
        acc, drafted = rates[name + " acceptance"]
        print(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates[name])} | {mean:.1f} | {mean / base:.2f}x | "
              f"{'-' if drafted == 0 else f'{acc:.2f}'} | {int(drafted)} |")


if __name__ == "__main__":
    main()
