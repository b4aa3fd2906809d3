"""Engine arguments: one dataclass, one CLI definition, so `needle serve --help` and `LLM(**kw)` agree."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'4GiB', '512M', '1e9' or a number -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read a byte size from {text!r} (try e.g. 4GiB or 512MiB)")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class EngineArgs:
    """Every engine knob. Field metadata holds the --help text; names match vLLM's flags where one exists."""

    model: str | None = field(default=None, metadata={
        "help": "Model: a Hugging Face model directory, a .gguf file, or omitted for the bundled "
                "SmolLM2-135M-Instruct."})
    load_format: str = field(default="auto", metadata={
        "help": "auto: real weights; dummy: random weights of the real shapes (for speed benchmarks).",
        "choices": ["auto", "dummy"]})
    dtype: str = field(default="auto", metadata={
        "help": "Weight and activation dtype. auto: bfloat16 on CUDA, float32 on CPU.",
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]."})
    seed: int = field(default=0, metadata={"help": "Seed for dummy weights and unseeded sampling."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Longest prompt + completion in tokens (default: the model's context length)."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences in one batch."})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "Token budget of one step; longer prompts are prefilled in chunks mixed with decodes."})
    page_size: int = field(default=16, metadata={"help": "Tokens per KV-cache page."})
    kv_cache_memory: str | None = field(default=None, metadata={
        "help": "Bytes for the KV cache, e.g. 2GiB (default on CPU: 1GiB; on CUDA: from "
                "--gpu-memory-utilization)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "Fraction of GPU memory for weights + activations + KV cache."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "Reuse the KV pages of shared prompt prefixes (hash chain of full pages)."})
    # Attention.
    attention: str = field(default="sparse", metadata={
        "help": "dense: every head reads the whole context; sparse: streaming heads read sinks + a "
                "local window, retrieval heads read the top-k pages.", "choices": ["dense", "sparse"]})
    sparse_policy: str = field(default="hierarchical", metadata={
        "help": "Page selection for retrieval heads: hierarchical (LServe), quest (flat page top-k), "
                "hip (tree search) or streaming (StreamingLLM baseline: the newest pages).",
        "choices": ["hierarchical", "quest", "hip", "streaming"]})
    sparse_page_score: str = field(default="mean", metadata={
        "help": "How quest/hierarchical score a 16-token page from its key summary: mean (q . mean key, "
                "ShadowKV's landmarks) or bound (Quest's upper bound from the key min/max).",
        "choices": ["mean", "bound"]})
    sparse_token_budget: int | None = field(default=None, metadata={
        "help": "Tokens each retrieval head reads per decode step (default: 1024 on CPU, 2048 on CUDA)."})
    sparse_page_size: int = field(default=64, metadata={
        "help": "Tokens per selection unit (hierarchical: physical page scored by the max of its "
                "16-token logical pages)."})
    selector_interval: int = field(default=4, metadata={
        "help": "Decode steps a page selection is reused for before it is recomputed."})
    dense_layers: int = field(default=2, metadata={"help": "The first N layers always attend densely."})
    sink_tokens: int = field(default=64, metadata={"help": "Attention-sink tokens kept by streaming heads."})
    local_tokens: int = field(default=256, metadata={
        "help": "Recent tokens kept by streaming heads at decode."})
    retrieval_local_tokens: int = field(default=64, metadata={
        "help": "Newest tokens retrieval heads always read at decode besides their chosen pages (whole "
                "selection units, plus the newest partial one); taken out of the budget."})
    prefill_local_tokens: int = field(default=2048, metadata={
        "help": "Recent tokens kept by streaming heads during prefill."})
    head_profile: str | None = field(default=None, metadata={
        "help": "JSON head profile (from `needle calibrate`); default: the one shipped for the model."})
    streaming_ratio: float | None = field(default=None, metadata={
        "help": "Override the profile's share of streaming heads (0 = all retrieval)."})
    sparse_recall_sample: float = field(default=0.01, metadata={
        "help": "Fraction of sparse decode steps that also run dense attention to measure recall."})

    def token_budget(self, device_type: str) -> int:
        """The sparse token budget: the flag, else 1/8 of an 8K context on CPU and 2048 on CUDA."""
        return self.sparse_token_budget or (2048 if device_type == "cuda" else 1024)

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """Add one --flag per field (booleans get --x / --no-x)."""
        for f in dataclasses.fields(EngineArgs):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs = {"help": f.metadata.get("help", ""), "default": f.default}
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _cli_type(f.type)
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})


def _cli_type(annotation: str | type):
    text = str(annotation)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str
