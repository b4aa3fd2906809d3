"""Tensor parallelism on the CPU: --tensor-parallel-size 2 over gloo against one process.

A random-weight Llama (transformers' LlamaForCausalLM, 4 heads / 2 KV heads, so each rank holds 2 query
heads and 1 KV head) saved with the bundled model's tokenizer; greedy tokens must be identical to TP=1,
dense and sparse (a head profile whose layers mix streaming and retrieval heads across the two ranks),
through LLM and through a live `needle serve` with the openai client. A rank killed mid-request makes
the server answer 503 and exit non-zero; what cannot be sharded is refused in one line.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from openai import OpenAI
from support import API_KEY, REPO, free_port, run_engine
from test_model_families import COMMON

from needle.engine import LLM, SamplingParams
from needle.engine.config import EngineArgs
from needle.engine.distributed import refusal
from needle.engine.loader import ModelLoadError

NEW_TOKENS = 12
# Small units and windows so that 100-200 token prompts decode sparsely (context > budget).
SPARSE = dict(attention="sparse", sink_tokens=16, sparse_unit_tokens=16, retrieval_local_tokens=16,
              local_tokens=32, sparse_token_budget=64, dense_layers=1, prefill_local_tokens=32,
              sparse_recall_sample=1.0)
DENSE = dict(attention="dense")
COMMON_ENGINE = dict(kv_cache_memory="32MiB", max_num_batched_tokens=64, max_model_len=512)
# Per layer and KV head: streaming (True) or retrieval; layers 1 and 3 give the ranks different kinds.
STREAMING = [[False, False], [True, False], [False, True], [True, True]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    """(model directory, its head profile) of a 4-layer random Llama with the bundled tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)}, num_hidden_layers=len(STREAMING))
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    profile = path / "head_profile.json"
    profile.write_text(json.dumps({"model": "tiny-llama", "scores": [[1.0, 1.0]] * len(STREAMING),
                                   "streaming": STREAMING}))
    return path, profile


def prompts(vocab: int = 1000) -> list[list[int]]:
    """Four prompts, the last sharing 4 full pages with the second; then the first again (a full prefix-
    cache hit): shared pages are rank 0's decision, so every rank must read the same page ids."""
    rng = random.Random(0)
    some = [[rng.randrange(1, vocab) for _ in range(n)] for n in (40, 150, 200, 26)]
    return [*some[:3], some[1][:64] + some[3], some[0]]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
# Output drawn from 8 tokens (logit_bias), prompts too: prompt lookup finds matches, some drafts are kept.
FEW_TOKENS = SamplingParams(temperature=0, max_tokens=2 * NEW_TOKENS,
                            logit_bias={t: 100.0 for t in range(1, 9)})


def generate(path, size: int, params: SamplingParams = GREEDY, vocab: int = 1000,
             **kw) -> tuple[dict[str, list[int]], list]:
    """Greedy tokens per prompt and every step's stats, from an engine of `size` ranks (closed after)."""
    llm = LLM(str(path), tensor_parallel_size=size, **{**COMMON_ENGINE, **kw})
    steps: list = []
    try:
        tokens = run_engine(llm.engine, {str(i): (p, params) for i, p in enumerate(prompts(vocab))},
                            steps.append)
    finally:
        llm.engine.close()
    return tokens, steps


def test_dense_greedy_tokens_match_one_process(tiny_llama):
    path, _ = tiny_llama
    assert generate(path, 2, **DENSE)[0] == generate(path, 1, **DENSE)[0]


def test_preemption_releases_reach_every_rank(tiny_llama):
    """A pool of 32 pages per rank, too few for the running sequences' 72 new tokens each: sequences are
    preempted and recomputed; their releases travel with the steps."""
    path, _ = tiny_llama
    longer = SamplingParams(temperature=0, max_tokens=6 * NEW_TOKENS)
    two, steps = generate(path, 2, longer, **DENSE, kv_cache_memory="256KiB")
    assert sum(s.num_preemptions for s in steps) > 0
    assert two == generate(path, 1, longer, **DENSE)[0]


def test_sparse_greedy_tokens_match_one_process(tiny_llama):
    path, profile = tiny_llama
    one, _ = generate(path, 1, **SPARSE, head_profile=str(profile))
    two, steps = generate(path, 2, **SPARSE, head_profile=str(profile))
    assert two == one
    read = [n for s in steps for n in s.attention.tokens_read]
    assert read and min(read) < 100, "no step decoded sparsely"
    assert any(s.attention.recall_samples for s in steps)  # rank 0's heads' recall reaches the stats
    assert one != generate(path, 1, **DENSE)[0]  # sparse attention changed something worth comparing


NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "dynamic": false}'


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_ngram_speculation_over_two_ranks_is_plain_greedy_decoding(tiny_llama, attention):
    """Verify steps and their rollbacks (the backend's schedule, the last kept summary) reach rank 1."""
    path, profile = tiny_llama
    kw = DENSE if attention == "dense" else {**SPARSE, "head_profile": str(profile)}
    plain, _ = generate(path, 1, FEW_TOKENS, vocab=9, **kw)
    speculated, steps = generate(path, 2, FEW_TOKENS, vocab=9, **kw, speculative_config=NGRAM)
    assert speculated == plain
    drafted = sum(s.spec.num_draft_tokens for s in steps if s.spec)
    accepted = sum(s.spec.num_accepted_tokens for s in steps if s.spec)
    assert drafted > accepted > 0  # some drafts kept, some rolled back


def test_heads_that_do_not_divide_are_refused_before_any_rank_starts(tiny_llama):
    path, _ = tiny_llama
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 must divide the model's 4 attention "
                                         r"heads, 2 KV heads, 128 MLP intermediate size"):
        LLM(str(path), tensor_parallel_size=3, **DENSE)


@pytest.mark.parametrize("flags, reason", [
    (dict(speculative_config='{"method": "self_sparse", "num_speculative_tokens": 2}'),
     "--speculative-config method self_sparse"),
    (dict(cpu_kv_cache_memory="64MiB"), "--cpu-kv-cache-memory"),
    (dict(sparse_min_recall=0.5), "--sparse-min-recall"),
])
def test_what_cannot_be_sharded_is_refused(tiny_llama, flags, reason):
    with pytest.raises(ModelLoadError, match=re.escape(reason)):
        LLM(str(tiny_llama[0]), tensor_parallel_size=2, **flags)


def test_more_ranks_than_gpus_is_refused():
    message = refusal(EngineArgs(tensor_parallel_size=max(2, torch.cuda.device_count() + 1)), "cuda")
    assert message and "GPUs" in message and "visible" in message


def start_server(path, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`needle serve MODEL --tensor-parallel-size 2 ...` -> (process, base url, its log lines so far)."""
    port = free_port()
    cmd = [sys.executable, "-m", "needle.server.cli", "serve", str(path), "--port", str(port), "--api-key",
           API_KEY, "--tensor-parallel-size", "2", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "needle ready" in line:
            return proc, f"http://127.0.0.1:{port}", lines
    raise RuntimeError("needle serve exited before it was ready:\n" + "".join(lines))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engine_flags(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]


def test_server_with_two_ranks_answers_as_one_process(tiny_llama):
    path, profile = tiny_llama
    flags = {**COMMON_ENGINE, **SPARSE, "head_profile": profile}
    llm = LLM(str(path), **flags)
    prompt = "The needle in the haystack is"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0].outputs[0].text
    proc, url, _ = start_server(path, *engine_flags(**flags))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                      max_tokens=NEW_TOKENS, temperature=0)
        assert r.choices[0].text == expected and r.usage.completion_tokens == NEW_TOKENS
    finally:
        stop(proc)


def test_a_rank_killed_while_idle_stops_the_server(tiny_llama):
    """The watchdog notices a dead rank with no request in flight: the server exits non-zero by itself."""
    path, _ = tiny_llama
    proc, url, lines = start_server(path, *engine_flags(**COMMON_ENGINE, **DENSE))
    try:
        os.kill(rank1_pid(lines), signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        assert any("rank 1" in line and "exited" in line for line in proc.stdout)
    finally:
        stop(proc)


def rank1_pid(lines: list[str]) -> int:
    return int(next(re.search(r"rank 1 of 2 started \(pid (\d+)\)", line).group(1)
                    for line in lines if "rank 1 of 2 started" in line))


def test_a_killed_rank_fails_the_server_cleanly(tiny_llama):
    """Rank 1 killed while a request streams: that request ends with a 503 error event, new requests get
    503, and the server exits non-zero within seconds instead of hanging."""
    path, _ = tiny_llama
    proc, url, lines = start_server(path, *engine_flags(**COMMON_ENGINE, **DENSE))
    try:
        pid = rank1_pid(lines)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 2:
                    os.kill(pid, signal.SIGKILL)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "rank 1" in error["message"] and error["code"] == "service_unavailable", error
        late = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers,
                          timeout=10)
        assert late.status_code == 503
        assert proc.wait(timeout=60) != 0
    finally:
        stop(proc)
        time.sleep(0.1)
