"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
