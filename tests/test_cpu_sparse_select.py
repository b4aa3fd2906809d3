"""Sparse decode on the CPU with the C++ paths (in-place attention, summaries in one call, per-step
position lists) against the torch path (NEEDLE_CPU_DECODE=0), on the real bundled SmolLM2: the same
units chosen at every layer and step, the same greedy tokens, the same keys counted as read."""

from __future__ import annotations

import random

import pytest
import torch
from support import run_engine

from needle.attention.cpu_decode import in_place_decode
from needle.engine.calibrate import passkey_prompt
from needle.engine.llm import LLM
from needle.scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not in_place_decode(torch.zeros(1, 1, 1, 8)),
                                reason="the in-place kernel is not built here (no compiler or no AVX2)")


def _decode(llm: LLM, prompt: list[int]) -> tuple[list[int], list[torch.Tensor], list[int]]:
    """Greedy tokens, every layer's chosen units per step, and the telemetry's keys read."""
    backend = llm.engine.backend
    chosen, read = [], []
    choose = backend._chosen_units

    def record(*args, **kwargs):
        units = choose(*args, **kwargs)
        chosen.append(units.clone())
        return units

    backend._chosen_units = record
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10)
        tokens = run_engine(llm.engine, {"r": (prompt, params)},
                            on_step=lambda step: read.extend(step.attention.tokens_read))["r"]
    finally:
        del backend._chosen_units
    return tokens, chosen, read


def test_cpu_paths_choose_what_the_torch_path_chooses(sparse_llm: LLM, monkeypatch):
    prompt, _, _ = passkey_prompt(sparse_llm.tokenizer, 2500, 0.3, random.Random(3))
    fast = _decode(sparse_llm, prompt)
    monkeypatch.setenv("NEEDLE_CPU_DECODE", "0")
    slow = _decode(sparse_llm, prompt)
    assert fast[0] == slow[0]
    assert len(fast[1]) == len(slow[1]) > 0
    for a, b in zip(fast[1], slow[1], strict=True):
        assert torch.equal(a, b)
    assert fast[2] == slow[2] and max(fast[2]) < 2500
