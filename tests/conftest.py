"""Shared fixtures: the real bundled model, its engines and its servers, each built once per session."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., Any]]:
    """serve(*flags) -> a live `needle serve` with those flags, started once and kept for the session."""
    from support import LiveServer, run_server  # the HTTP test tools stay off GPU-only runs

    servers: dict[tuple[str, ...], LiveServer] = {}
    with contextlib.ExitStack() as stack:
        def start(*flags: str):
            if flags not in servers:
                servers[flags] = stack.enter_context(run_server(*flags))
            return servers[flags]

        yield start
