"""Shared fixtures: the real bundled model, its engines and its servers, each built once per session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from needle.engine import LLM
from needle.engine.loader import bundled_gguf, gguf_to_directory


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled SmolLM2 GGUF, dequantised by transformers and cached as safetensors."""
    return gguf_to_directory(bundled_gguf())


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def dense_llm() -> LLM:
    """Dense attention; 512-token steps, so prompts longer than that are prefilled in chunks."""
    return LLM(attention="dense", kv_cache_memory="512MiB", max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def sparse_llm() -> LLM:
    """The default sparse configuration, with recall measured on every decode step."""
    return LLM(attention="sparse", sparse_recall_sample=1.0, max_num_batched_tokens=4096)


LIVE_SERVERS = 4  # each holds a model (~1 GiB): more at once ran the 24 GiB CI box out of memory


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., Any]]:
    """serve(*flags) -> a live `needle serve` with those flags, started once and shared across modules.

    At most LIVE_SERVERS run at once: starting another stops the one unused the longest, never one the
    current test module has used (its fixtures may still hold it)."""
    from support import LiveServer, run_server  # the HTTP test tools stay off GPU-only runs

    servers: dict[tuple[str, ...], tuple[LiveServer, contextlib.ExitStack, str]] = {}

    def module() -> str:
        return os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]

    def start(*flags: str):
        here = module()
        if flags not in servers:
            idle = [f for f, (_, _, m) in servers.items() if m != here]
            while len(servers) >= LIVE_SERVERS and idle:
                servers.pop(idle.pop(0))[1].close()  # dicts keep use order: the first is the oldest
            stack = contextlib.ExitStack()
            servers[flags] = (stack.enter_context(run_server(*flags)), stack, here)
        server, stack, _ = servers.pop(flags)
        servers[flags] = (server, stack, here)  # most recently used last
        return server

    try:
        yield start
    finally:
        for _, stack, _ in servers.values():
            stack.close()
