"""Long natural-text prompts from what ships with every Python: the standard library's own source."""

from __future__ import annotations

import sysconfig
from pathlib import Path

SOURCES = ("argparse.py", "subprocess.py", "typing.py", "inspect.py", "dataclasses.py")


def stdlib_modules(modules: tuple[str, ...]) -> str:
    """Whole standard-library modules (e.g. "argparse", "logging/__init__"), blank-line separated."""
    return "\n\n".join(_source(f"{m}.py") for m in modules)


def stdlib_text(num_chars: int, offset: int = 0) -> str:
    text = ""
    for name in SOURCES:
        text += _source(name)
        if len(text) >= offset + num_chars:
            break
    return text[offset:offset + num_chars]


def _source(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text()


def long_prompt(tokenizer, num_tokens: int, offset: int = 0) -> list[int]:
    """Exactly num_tokens token ids of stdlib source, starting offset characters in."""
    ids = tokenizer.encode(stdlib_text(num_tokens * 6, offset))
    assert len(ids) >= num_tokens
    return ids[:num_tokens]
