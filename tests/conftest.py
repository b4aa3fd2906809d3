"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from engine.loader import bundled_gguf, gguf_to_directory


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


def stdlib_text(num_chars: int, offset: int = 0) -> str:
    """Natural text that ships with every Python: the standard library's own source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in ("argparse.py", "subprocess.py", "typing.py", "inspect.py", "dataclasses.py"):
        text += (root / name).read_text()
        if len(text) >= offset + num_chars:
            break
    return text[offset:offset + num_chars]


def long_prompt(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(stdlib_text(num_tokens * 6, offset))
    assert len(ids) >= num_tokens
    return ids[:num_tokens]
