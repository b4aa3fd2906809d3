"""Value offload (--cpu-kv-cache-memory) on the CPU, where the "device" and "host" tiers are two CPU pools.

Greedy tokens with offload equal those of the same sparse configuration without it: eight prompts
submitted in a staggered stream (two over 2,000 tokens, two sharing a prefix with a third), with a
long sequence preempted while it decodes (recomputed through the prefix cache, whose pages come back
from the host) and a host tier small enough to fill. Aborts free both tiers; the server
exports the offload metrics and refuses a budget the value cache is not sized for.
"""

from __future__ import annotations

import random

import httpx
import pytest
from support import error_of, run_engine, run_staggered

from needle.engine.config import EngineArgs
from needle.engine.llm_engine import LLMEngine
from needle.engine.loader import ModelLoadError
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams

COMMON = dict(attention="sparse", device="cpu", max_model_len=2304, max_num_seqs=4, sparse_token_budget=256,
              max_num_batched_tokens=512, sparse_recall_sample=1.0)
TIGHT = dict(kv_cache_memory="280MiB", cpu_kv_cache_memory="24MiB")  # the host tier fills
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    words = lambda n: [rng.randrange(200, 40000) for _ in range(n)]  # noqa: E731
    shared = words(520)
    return [shared + words(90), words(260), shared + words(150), words(2050), words(2010), words(330),
            words(400), words(300)]


@pytest.fixture(scope="module")
def offload_engine() -> LLMEngine:
    return LLMEngine(EngineArgs(**COMMON, **TIGHT))


def run_with_preemption(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict, list, list]:
    """run_staggered, preempting the first long sequence to decode 3 tokens (the scheduler's own
    preemption: its pages are freed and it is recomputed later, so its later tokens see recomputed KV:
    both engines get the same treatment). Checks the tier invariants after every step."""
    stats, preempted = [], []
    engine_step = engine.step

    def step():
        long = [s for s in engine.scheduler.running if s.num_prompt_tokens > 2000 and s.num_output >= 3]
        if long and not preempted:
            engine.scheduler._preempt(long[0])
            preempted.append(long[0].request_id)
        outputs, s = engine_step()
        stats.append(s)
        if engine.tiers is not None:
            engine.tiers.check({p for seq in engine.scheduler.running for p in seq.pages.page_table})
        return outputs, s

    engine.step = step
    try:
        return run_staggered(engine, prompts, GREEDY), stats, preempted
    finally:
        del engine.step


@pytest.fixture(scope="module")
def plain_engine() -> LLMEngine:
    return LLMEngine(EngineArgs(**COMMON, kv_cache_memory="512MiB"))


@pytest.fixture(scope="module")
def runs(prompts, offload_engine, plain_engine) -> dict[str, object]:
    got, stats, preempted = run_with_preemption(offload_engine, prompts)
    base, _, base_preempted = run_with_preemption(plain_engine, prompts)
    assert preempted == base_preempted
    return {"offload": got, "base": base, "stats": stats, "preempted": preempted}


def test_greedy_tokens_equal_sparse_without_offload(runs):
    base, got = runs["base"], runs["offload"]
    assert set(got) == set(base) and len(got) == 8
    for rid in base:
        assert got[rid][0] == base[rid][0], f"request {rid} differs with offload"


def test_the_run_exercised_every_path(runs):
    stats = runs["stats"]
    assert runs["preempted"], "a long sequence should have been preempted while decoding"
    assert sum(s.prefix_cache_hits for s in stats) > 0
    offload = [s.offload for s in stats]
    assert sum(o.bytes_to_host for o in offload) > 0
    assert sum(o.misses for o in offload) > 0 and sum(o.hits for o in offload) > 0
    assert max(s.cpu_kv_cache_usage for s in stats) == 1.0, "the host tier should fill"
    recall = [r for s in stats for r in s.attention.recall_samples]
    assert recall and all(0.0 < r <= 1.0 + 1e-6 for r in recall)


def test_abort_frees_both_tiers(runs, offload_engine, prompts):
    engine, tiers = offload_engine, offload_engine.tiers
    engine.add_request("long", prompts[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("short", prompts[4], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while not any(s.num_output > 2 for s in engine.scheduler.running if s.request_id == "long"):
        engine.step()
    assert tiers.host_of, "the decoding sequence's values should be on the host"
    engine.abort("long")
    run_engine(engine)
    tiers.poll()
    tiers.check(set())
    assert not tiers.slot_of and len(tiers.free_slots) == tiers.sizes.resident_slots
    assert set(tiers.host_of) == set(tiers.idle), "only evictable prefix-cache pages may stay on the host"


def test_a_dense_request_keeps_every_value_on_the_device(runs, offload_engine, plain_engine, prompts):
    """Dense mode reads the whole context each step, so its pages never move (no 400: it is served)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            attention=AttentionOverride("dense"))
    tiers = offload_engine.tiers

    def all_resident(_stats) -> None:
        pages = [p for seq in offload_engine.scheduler.running for p in seq.pages.page_table]
        assert all(p in tiers.slot_of for p in pages)

    got = run_engine(offload_engine, {"dense": (prompts[6], params)}, on_step=all_resident)
    assert got == run_engine(plain_engine, {"dense": (prompts[6], params)})


def test_offload_refuses_what_it_cannot_serve():
    with pytest.raises(ModelLoadError, match="--attention sparse"):
        LLMEngine(EngineArgs(attention="dense", device="cpu", cpu_kv_cache_memory="16MiB"))


def test_server_exports_offload_metrics_and_refuses_a_larger_budget(serve):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items() if k != "attention"]
    server = serve("--cpu-kv-cache-memory", "32MiB", "--kv-cache-memory", "320MiB", *flags)
    model = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"]
    body = {"model": model, "prompt": list(range(300, 900)), "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    metrics = server.metrics()
    assert metrics[("needle:kv_offload_value_cache_queries_total", ())] > 0
    assert metrics[("needle:kv_offload_device_to_host_bytes_total", ())] > 0
    assert ("needle:cpu_cache_usage_perc", ()) in metrics
    body["attention"] = {"token_budget": 512}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=30)
    err = error_of(r, 400)
    assert err["param"] == "attention.token_budget"
