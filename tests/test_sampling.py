"""Sampling on the real model: seeds reproduce, whatever else shares the batch; stop rules hold."""

from __future__ import annotations

import pytest
from support import run_engine

from needle.engine import LLM, SamplingParams


@pytest.fixture
def llm(dense_llm: LLM) -> LLM:
    return dense_llm


def test_seed_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Write a poem about the sea.", params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True)
    engine = llm.engine
    engine.add_request("noise-a", "Tell me about cats.", others)
    engine.step()
    got = run_engine(engine, {"seeded": ("Write a poem about the sea.", params),
                              "noise-b": ("What is 2 + 2?", others)})
    assert got["seeded"] == alone
    different = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate("Write a poem about the sea.", different)[0].outputs[0].token_ids != alone


def test_n_choices_differ_and_share_prompt(llm):
    out = llm.generate("Name a fruit:", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_and_length(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = llm.generate("Hello, my name is", greedy)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    word = full.text.split()[2]
    stopped = llm.generate("Hello, my name is",
                           SamplingParams(temperature=0, max_tokens=10, stop=[word]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == word
    assert stopped.text == full.text[: full.text.index(word)]


def test_penalties_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5, logprobs=3, ignore_eos=True)
    out = llm.generate("one one one one one one", params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert tok in lp and 3 <= len(lp) <= 4 and all(v <= 0 for v in lp.values())
    assert "one" not in out.text.lower().split()[:3]


def test_stop_token_ids_and_min_tokens(llm):
    greedy = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    stop_at = greedy.token_ids[2]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=6,
                                                         stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids[-1] == stop_at
