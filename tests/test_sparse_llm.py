"""Sparse attention through LLM with the real bundled SmolLM2: passkey at 4K, per-request overrides."""

from __future__ import annotations

import random

import pytest
from support import run_engine

from needle.attention.base import AttentionStats
from needle.engine.calibrate import passkey_prompt
from needle.engine.llm import LLM
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams


@pytest.fixture
def llm(sparse_llm: LLM) -> LLM:
    return sparse_llm


def _run(llm: LLM, prompt: list[int], override: AttentionOverride | None, max_tokens: int = 3):
    """Generate greedily, returning the text and the step telemetry the engine drained."""
    stats = AttentionStats()

    def gather(step) -> None:
        stats.recall_samples.extend(step.attention.recall_samples)
        stats.tokens_read.extend(step.attention.tokens_read)
        stats.dense_fallbacks += step.attention.dense_fallbacks

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, attention=override)
    tokens = run_engine(llm.engine, {"r": (prompt, params)}, on_step=gather)["r"]
    return llm.tokenizer.decode(tokens), stats


def test_passkey_at_4k_with_the_default_sparse_config(llm: LLM):
    """A prompt dense attention answers (SmolLM2-135M misses some 4K passkeys even dense)."""
    prompt, _, key = passkey_prompt(llm.tokenizer, 4000, 0.1, random.Random(8))
    text, stats = _run(llm, prompt, None, max_tokens=9)
    assert key in text.replace(" ", "")
    assert stats.tokens_read and max(stats.tokens_read) < 2000  # far below the 4K context
    assert stats.recall_samples and min(stats.recall_samples) > 0.5


def test_per_request_budget_and_dense_override(llm: LLM):
    prompt, _, _ = passkey_prompt(llm.tokenizer, 900, 0.5, random.Random(3))
    _, small = _run(llm, prompt, AttentionOverride(mode="sparse", token_budget=256))
    _, large = _run(llm, prompt, AttentionOverride(mode="sparse", token_budget=640))
    _, fits = _run(llm, prompt, AttentionOverride(mode="sparse", token_budget=2048))
    _, dense = _run(llm, prompt, AttentionOverride(mode="dense"))
    assert max(small.tokens_read) < min(large.tokens_read)
    assert fits.dense_fallbacks > 0 and not fits.tokens_read
    assert dense.dense_fallbacks == 0 and not dense.tokens_read


def test_prefix_cache_is_shared_only_where_the_kv_is_the_same(llm: LLM):
    """Streaming heads change the hidden states, so sparse-prefilled KV must never serve a dense request;
    budgets within the streaming heads' prefill window prefill alike and share, a wider one does not."""
    prompt, _, _ = passkey_prompt(llm.tokenizer, 600, 0.5, random.Random(5))
    prompt = llm.tokenizer.encode("A preface no other test in this module sends. " * 3) + prompt
    def cached_tokens(override: AttentionOverride) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=1, attention=override)
        return llm.generate(prompt, params)[0].num_cached_tokens

    cached_tokens(AttentionOverride(mode="sparse", token_budget=256))
    assert cached_tokens(AttentionOverride(mode="sparse", token_budget=256)) > 0
    assert cached_tokens(AttentionOverride(mode="sparse", token_budget=512)) > 0
    assert cached_tokens(AttentionOverride(mode="sparse", token_budget=4096)) == 0
    assert cached_tokens(AttentionOverride(mode="dense")) == 0
    assert cached_tokens(AttentionOverride(mode="dense")) > 0
