"""--generation-config: default sampling settings from the model's `generation_config.json`, as vLLM
takes them (`auto`), from another folder's, or none (`vllm`: SamplingParams' own defaults).

Only what a request leaves unset takes these; vLLM reads the same keys (and ignores `do_sample`).
"""

from __future__ import annotations

import json
from pathlib import Path

from needle.engine.loader import ModelLoadError

# generation_config.json key -> SamplingParams field
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(setting: str, model_path: Path) -> dict[str, float | int]:
    if setting == "vllm":
        return {}
    folder = model_path if setting == "auto" else Path(setting)
    file = folder / "generation_config.json"
    if setting != "auto" and not file.is_file():
        raise ModelLoadError(f"--generation-config {setting}: no generation_config.json in that folder "
                             "(give a folder holding one, 'auto' for the model's, or 'vllm' for none)")
    if not folder.is_dir() or not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{file} is not valid JSON: {err}") from None
    return {field: raw[key] for key, field in _KEYS.items() if raw.get(key) is not None}
