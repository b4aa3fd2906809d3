"""Load generator for a running `needle serve`: throughput and latency at a few concurrency levels.

Each level sends `--requests` streaming completions, at most `--concurrency` in flight at once, with
`ignore_eos` so every request generates exactly `--max-tokens` tokens. Per request it records the time
to the first token (TTFT), the gaps between later chunks (ITL) and the end-to-end latency; it prints
one markdown table row per level.

    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


@dataclass
class Sample:
    ttft: float
    itl: list[float]
    e2e: float
    output_tokens: int


@dataclass
class Level:
    concurrency: int
    wall: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    failures: int = 0


def prompt(i: int, words: int) -> str:
    """Distinct from the first token on, so the prefix cache cannot share whole prompts."""
    body = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))
    return f"Request {i}. Continue this text: {body}"


async def one_request(http: httpx.AsyncClient, model: str, text: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk["choices"]):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("no tokens came back")
    return Sample(ttft=stamps[0] - start, itl=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                  e2e=time.perf_counter() - start, output_tokens=tokens)


async def run_level(http: httpx.AsyncClient, model: str, concurrency: int, requests: int, words: int,
                    max_tokens: int, offset: int) -> Level:
    level = Level(concurrency)
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        todo.put_nowait(offset + i)

    async def worker() -> None:
        while not todo.empty():
            i = todo.get_nowait()
            try:
                level.samples.append(await one_request(http, model, prompt(i, words), max_tokens))
            except (httpx.HTTPError, RuntimeError) as err:
                level.failures += 1
                print(f"request {i} failed: {err}")

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    level.wall = time.perf_counter() - start
    return level


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats_ms(values: list[float]) -> str:
    if not values:
        return "- / - / -"
    mean = sum(values) / len(values)
    return " / ".join(f"{1000 * v:.0f}" for v in (mean, percentile(values, 50), percentile(values, 99)))


def table(levels: list[Level]) -> str:
    rows = ["| concurrency | requests ok / failed | req/s | output tok/s | TTFT ms mean / p50 / p99 "
            "| ITL ms mean / p50 / p99 | E2E ms mean / p50 / p99 |",
            "|---|---|---|---|---|---|---|"]
    for lv in levels:
        ok = len(lv.samples)
        tokens = sum(s.output_tokens for s in lv.samples)
        rows.append(f"| {lv.concurrency} | {ok} / {lv.failures} | {ok / lv.wall:.2f} | "
                    f"{tokens / lv.wall:.1f} | "
                    f"{stats_ms([s.ttft for s in lv.samples])} | "
                    f"{stats_ms([g for s in lv.samples for g in s.itl])} | "
                    f"{stats_ms([s.e2e for s in lv.samples])} |")
    return "\n".join(rows)


async def main_async(ns: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=max(ns.concurrency) + 4)
    async with httpx.AsyncClient(base_url=ns.url, headers=headers, timeout=ns.timeout, limits=limits) as http:
        model = ns.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        await one_request(http, model, prompt(-1, ns.prompt_words), 4)  # warm-up, not measured
        levels, offset = [], 0
        for concurrency in ns.concurrency:
            levels.append(await run_level(http, model, concurrency, ns.requests, ns.prompt_words,
                                          ns.max_tokens, offset))
            offset += ns.requests
    print(f"model {model}, {ns.requests} requests per level, prompt ~{ns.prompt_words} words, "
          f"{ns.max_tokens} output tokens each (ignore_eos), streaming /v1/completions\n")
    print(table(levels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Server base URL.")
    parser.add_argument("--api-key", default=None, help="Bearer key, if the server wants one.")
    parser.add_argument("--model", default=None, help="Model name (default: the server's first).")
    parser.add_argument("--concurrency", default="1,4,16",
                        type=lambda s: [int(x) for x in s.split(",")], help="Comma-separated levels.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per level.")
    parser.add_argument("--prompt-words", type=int, default=100, help="Words of filler in each prompt.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per request.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout in seconds.")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
