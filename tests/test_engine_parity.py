"""Greedy output of needle's dense path is token-identical to transformers on the real model."""

from __future__ import annotations

import pytest
import torch
from support import run_engine, run_staggered

from bench.texts import long_prompt
from needle.engine import LLM, SamplingParams

NEW_TOKENS = 12
LOGPROB_TOLERANCE = 2e-3


def hf_greedy(hf_model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Reference tokens and the logprob of each chosen token, from transformers' generate."""
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens,
                                                                                     strict=False)]
    return tokens, logprobs


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    short = ["Hello, my name is", "The capital of France is", "def fibonacci(n):",
             "List three colours:", "Once upon a time"]
    ids = [tokenizer.encode(p) for p in short]
    ids.append(long_prompt(tokenizer, 2300))
    ids.append(long_prompt(tokenizer, 2100, offset=40_000))
    ids.append(long_prompt(tokenizer, 600, offset=90_000))
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def test_greedy_matches_transformers(dense_llm, prompts, reference):
    """Short prompts prefill in one step, the long ones in 512-token chunks mixed with decodes."""
    llm = dense_llm
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=1)
    got = {rid: (tokens, [d[t] for d, t in zip(lps, tokens, strict=True)])
           for rid, (tokens, lps) in run_staggered(llm.engine, prompts, params, add=3, steps=2).items()}
    for i, (ref_tokens, ref_logprobs) in enumerate(reference):
        tokens, logprobs = got[str(i)]
        assert tokens == ref_tokens, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < LOGPROB_TOLERANCE


def test_prefix_cache_hits_and_preemption_keep_output(dense_llm, hf_model, prompts, reference):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    llm = dense_llm
    first = llm.generate(prompts[5], params)[0]
    again = llm.generate(prompts[5], params)[0]
    assert again.num_cached_tokens >= len(prompts[5]) - 16 - 1
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == reference[5][0]

    # A pool of 8 pages for 4 sequences of 3 pages each: sequences must be preempted and recomputed.
    many = 40
    refs = [hf_greedy(hf_model, p, many)[0] for p in prompts[:4]]
    tiny = LLM(attention="dense", kv_cache_memory="6MiB", enable_prefix_caching=False)
    engine = tiny.engine
    long_params = SamplingParams(temperature=0, max_tokens=many)
    preemptions = []
    results = run_engine(engine, {str(i): (prompts[i], long_params) for i in range(4)},
                         on_step=lambda stats: preemptions.append(stats.num_preemptions))
    assert sum(preemptions) > 0
    assert [results[str(i)] for i in range(4)] == refs
    assert engine.allocator.num_free == engine.allocator.num_pages
