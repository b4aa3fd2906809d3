"""Prompt logprobs, computed in the prefill: equal to transformers' on the real model, through chunked
prefill, the prefix cache and n > 1; served as `echo` + `logprobs`, which lm-evaluation-harness's
`local-completions` model scores multiple-choice tasks with, end to end."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from support import SMALL, error_of

from bench.texts import long_prompt
from needle.engine import SamplingParams

TOLERANCE = 2e-3  # fp32 on both sides, the engine parity tests' bound per token logprob


def hf_prompt_logprobs(hf_model, ids: list[int]) -> list[float]:
    """log p(token i | tokens < i) for i >= 1, from one transformers forward pass."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def picked(entries: list, ids: list[int]) -> list[float]:
    assert entries[0] is None and len(entries) == len(ids)
    return [entry[t] for entry, t in zip(entries[1:], ids[1:], strict=True)]


@pytest.fixture(scope="module")
def long_ids(tokenizer) -> list[int]:
    return long_prompt(tokenizer, 1300, offset=7_000)  # > 512: three prefill chunks on dense_llm


def test_prompt_logprobs_match_transformers_through_chunked_prefill(dense_llm, hf_model, tokenizer, long_ids):
    short = tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    outs = dense_llm.generate([short, long_ids], params)
    for ids, out in zip([short, long_ids], outs, strict=True):
        got, ref = picked(out.prompt_logprobs, ids), hf_prompt_logprobs(hf_model, ids)
        assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < TOLERANCE
        for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True):
            top = sorted(entry.values(), reverse=True)
            assert token in entry and len(entry) in (3, 4)  # the top 3 and the prompt token
            assert entry[token] <= top[0] + 1e-6


def test_cached_prefix_and_siblings_still_give_every_position(dense_llm, long_ids):
    """A prompt whose pages the prefix cache holds is computed again in full when it asks for prompt
    logprobs; its n siblings share that prefill and the request reports the entries once."""
    dense_llm.generate([long_ids], SamplingParams(temperature=0, max_tokens=1))  # fills the cache
    plain, scored = dense_llm.generate([long_ids, long_ids], [
        SamplingParams(temperature=0, max_tokens=4),
        SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=4, prompt_logprobs=0)])
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs is None
    assert scored.num_cached_tokens == 0 and len(scored.outputs) == 3
    assert all(e is not None and len(e) == 1 for e in scored.prompt_logprobs[1:])


def test_max_logprobs_bounds_requests(dense_llm):
    with pytest.raises(ValueError, match="prompt_logprobs must be at most 20"):
        dense_llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=21))
    with pytest.raises(ValueError, match="must be non-negative"):
        SamplingParams(logprobs=-1)


# -- over HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(serve):
    return serve(*SMALL, "--max-logprobs", "5")


def test_openai_client_echo_with_logprobs(server, hf_model, tokenizer):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    model = client.models.list().data[0].id
    prompt = "Paris is the capital of"
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                  temperature=0)
    choice = r.choices[0]
    lps = choice.logprobs
    assert choice.text.startswith(prompt) and len(lps.tokens) == len(ids) + 3
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    ref = hf_prompt_logprobs(hf_model, ids)
    assert max(abs(a - b) for a, b in zip(lps.token_logprobs[1:len(ids)], ref, strict=True)) < TOLERANCE
    assert all(len(top) == 2 for top in lps.top_logprobs[1:])
    assert "".join(lps.tokens[:len(ids)]) == prompt
    stream = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                       temperature=0, stream=True)
    streamed = {"text": "", "tokens": [], "token_logprobs": []}
    for event in stream:
        c = event.choices[0]
        streamed["text"] += c.text
        if c.logprobs is not None:
            streamed["tokens"] += c.logprobs.tokens
            streamed["token_logprobs"] += c.logprobs.token_logprobs
    assert streamed == {"text": choice.text, "tokens": lps.tokens, "token_logprobs": lps.token_logprobs}


def test_logprobs_above_max_logprobs_is_400(server):
    import httpx

    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                   json={"prompt": "Hi", "echo": True, "logprobs": 6, "max_tokens": 1})
    err = error_of(r, 400)
    assert err["param"] == "logprobs" and "--max-logprobs" in err["message"]


TASK_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a banana"], "gold": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven", "the moon"], "gold": 0},
    {"question": "The colour of the clear daytime sky is", "choices": ["green", "blue"], "gold": 1},
]


def write_task(folder) -> str:
    """A local multiple-choice task, as lm-eval's YAML task format describes one."""
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TASK_DOCS))
    (folder / "needle_mc.yaml").write_text(f"""\
task: needle_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
""")
    return "needle_mc"


def test_lm_eval_local_completions_loglikelihoods_match_transformers(server, model_dir, hf_model, tokenizer,
                                                                     tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    from lm_eval.tasks import TaskManager

    task = write_task(tmp_path)
    model = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key).models.list().data[0].id
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model={model},tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        apply_chat_template=False)
    samples = results["samples"][task]
    assert len(samples) == len(TASK_DOCS)
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            loglikelihood = resp[0][0]  # one (loglikelihood, is_greedy) per request
            ctx = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            assert whole[:len(ctx)] == ctx
            ref = sum(hf_prompt_logprobs(hf_model, whole)[len(ctx) - 1:])
            assert math.isclose(loglikelihood, ref, abs_tol=TOLERANCE * (len(whole) - len(ctx)))
    assert results["results"][task]["acc,none"] == 1.0
