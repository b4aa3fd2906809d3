"""Engine arguments: one dataclass, one CLI definition, so `needle serve --help` and `LLM(**kw)` agree."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch

from needle.attention.sparse import SparseConfig

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
        "help": "Model: a Hugging Face model directory, a Hugging Face Hub repo (ORG/NAME), a .gguf file, "
                "or omitted for the bundled SmolLM2-135M-Instruct."})
    revision: str | None = field(default=None, metadata={
        "help": "Hugging Face Hub model: the branch, tag or commit to use (default: main)."})
    download_dir: str | None = field(default=None, metadata={
        "help": "Hugging Face Hub model: the cache directory to download into and read from (default: "
                "huggingface_hub's, $HF_HOME/hub). HF_TOKEN and HF_HUB_OFFLINE=1 apply as usual."})
    load_format: str = field(default="auto", metadata={
        "help": "auto: real weights; dummy: random weights of the real shapes (for speed benchmarks).",
        "choices": ["auto", "dummy"]})
    dtype: str = field(default="auto", metadata={
        "help": "Weight and activation dtype. auto: bfloat16 on CUDA, float32 on CPU.",
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]."})
    quantization: str = field(default="none", metadata={
        "help": "Weight-only quantisation. int4 (CPU only; `make serve` uses it): every linear layer as "
                "int4 in groups of 32 (GGUF Q4_1's layout; decode steps through torch's int4 kernel with "
                "bf16 activations, prefill chunks dequantised to fp32) and the LM head as int8 in groups "
                "of 32 (Q8_0, int8 activations); none: the dtype's weights.", "choices": ["none", "int4"]})
    seed: int = field(default=0, metadata={"help": "Seed for dummy weights and unseeded sampling."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Longest prompt + completion in tokens (default: the model's context length)."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences in one batch."})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "Token budget of one step; longer prompts are prefilled in chunks mixed with decodes."})
    page_size: int = field(default=16, metadata={"help": "Tokens per KV-cache page.",
                                                 "aliases": ["--block-size"]})
    enable_chunked_prefill: bool = field(default=True, metadata={
        "help": "Prefill long prompts in chunks of --max-num-batched-tokens mixed with decodes. Always on "
                "(vLLM's flag, accepted): --no-enable-chunked-prefill is refused."})
    kv_cache_memory: str | None = field(default=None, metadata={
        "help": "Bytes for the KV cache, e.g. 2GiB (default on CPU: 1GiB; on CUDA: from "
                "--gpu-memory-utilization)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "Fraction of GPU memory for weights + activations + KV cache."})
    cpu_kv_cache_memory: str | None = field(default=None, metadata={
        "help": "Host memory for offloaded KV values, e.g. 64GiB (sparse attention; default: none, nothing "
                "is offloaded). Once a sequence decodes, the values of its pages outside the sinks and the "
                "local window move to this tier (pinned memory on CUDA), in every layer past "
                "--dense-layers; keys, key summaries and those values stay on the device, which then "
                "holds about 1.75x the tokens (Llama-3.1-8B). Each decode step copies back the "
                "selected pages that its device value cache lacks. Costs: host->device copies when "
                "selections change, and eager steps (no CUDA graphs: each layer fetches what it just "
                "selected, which the host must see); pinning "
                "takes ~0.65 s per GiB at start-up."})
    max_logprobs: int = field(default=20, metadata={
        "help": "Most top logprobs per token a request may ask for (logprobs, prompt_logprobs, "
                "top_logprobs); more get 400."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "Reuse the KV pages of shared prompt prefixes (hash chain of full pages)."})
    # Attention.
    attention: str = field(default="sparse", metadata={
        "help": "dense: every head reads the whole context; sparse: streaming heads read sinks + a "
                "local window, retrieval heads read the top-k pages.", "choices": ["dense", "sparse"]})
    sparse_policy: str = field(default="hierarchical", metadata={
        "help": "Unit selection for retrieval heads: hierarchical (LServe), quest (flat top-k of "
                "16-token summaries), hip (tree search) or recent (the StreamingLLM baseline: the newest "
                "units, whatever the query).",
        "choices": ["hierarchical", "quest", "hip", "recent"]})
    sparse_page_score: str = field(default="mean", metadata={
        "help": "How quest/hierarchical score a 16-token page from its key summary: mean (q . mean key, "
                "ShadowKV's landmarks) or bound (Quest's upper bound from the key min/max).",
        "choices": ["mean", "bound"]})
    sparse_token_budget: int | None = field(default=None, metadata={
        "help": "Tokens each retrieval head reads per decode step (default: 1024 on CPU, 2048 on CUDA)."})
    sparse_unit_tokens: int = field(default=64, metadata={
        "help": "Tokens per selection unit of the hierarchical policy (a unit scores as the best of its "
                "16-token summaries); quest, hip and recent select single summaries."})
    sparse_selection: str = field(default="kv-head", metadata={
        "help": "Who picks a retrieval head's units: kv-head (the query heads of a GQA group vote, one "
                "selection per KV head) or query-head (each query head selects its own, as LServe).",
        "choices": ["kv-head", "query-head"]})
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
    sparse_prefill_density: float = field(default=0.0, metadata={
        "help": "Block-sparse prefill for retrieval heads: each 128-token block of queries reads this share "
                "of the key blocks before it (always the first block, its own and the previous one; the "
                "rest ranked by an antidiagonal estimate of their attention), so long prompts prefill "
                "faster. 0: retrieval heads prefill densely, as LServe does."})
    head_profile: str | None = field(default=None, metadata={
        "help": "JSON head profile (from `needle calibrate`); default: the one shipped for the model."})
    streaming_ratio: float | None = field(default=None, metadata={
        "help": "Override the profile's share of streaming heads (0 = all retrieval)."})
    sparse_recall_sample: float = field(default=0.01, metadata={
        "help": "Fraction of sparse decode steps that also run dense attention to measure recall."})
    sparse_observation_window: int = field(default=32, metadata={
        "help": "Prompt-aware selection: the attention mass of the prompt's last N queries over the "
                "context picks the retrieval heads' units for the first decode steps (0: off; QUALITY.md "
                "shows 32 recovers the facts far from the question at 8K). Prefix-cache hits then stop N "
                "tokens before a prompt's end, so those queries are computed."})
    sparse_min_recall: float = field(default=0.0, metadata={
        "help": "Fidelity guard: a sequence whose sampled recall (attention mass its selection holds) is "
                "below this doubles its budget for the rest of its decode, up to dense; its first sparse "
                "decode step is always sampled (0: off)."})
    sparse_top_p: float = field(default=0.0, metadata={
        "help": "Adaptive budget (Twilight's top-p): each retrieval head's chosen units stop once they hold "
                "this share of the estimated attention mass over the eligible units (softmax of the unit "
                "scores; for the prompt-aware seed, the window's exact mass), within the token budget as "
                "the cap and --sparse-top-p-floor as the floor. hierarchical and quest only; torch "
                "attention backend only (0: off, a fixed k fills the budget)."})
    sparse_top_p_floor: int = field(default=256, metadata={
        "help": "With --sparse-top-p: the fewest tokens of chosen units a retrieval head keeps, however "
                "concentrated the estimated mass."})
    sparse_drift: float = field(default=0.0, metadata={
        "help": "Reselect on query drift: a retrieval head also reselects between the --selector-interval "
                "reselections (which stay the maximum spacing) when the cosine similarity of its query to "
                "the query that made its selection falls below this (0: off). A seeded selection is kept "
                "for the interval. Torch attention backend only; refused with speculative decoding, "
                "whose drafts cannot know where plain decoding would reselect."})

    speculative_config: str | None = field(default=None, metadata={
        "help": 'Speculative decoding, as JSON (vLLM\'s): {"method": "ngram" | "self_sparse" | '
                '"draft_model", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 4, '
                '"model": PATH (draft_model), "draft_token_budget": 512 (self_sparse), "dynamic": true '
                '(pick k in 0..K each step by goodput; false: always K)}. A request opts out with '
                '"speculative": false.'})

    # Execution.
    tensor_parallel_size: int = field(default=1, metadata={
        "aliases": ["-tp"],
        "help": "Split the model over N processes, one per GPU (NCCL; gloo on the CPU), started by needle "
                "itself: each rank holds 1/N of the attention heads, KV heads (with their KV pages and "
                "summaries) and MLP; the embedding and LM head are replicated. Heads and KV heads must "
                "divide by N. Speculation: ngram only; value offload is refused."})
    attention_backend: str = field(default="auto", metadata={
        "help": "Attention kernels: torch (plain torch, the CPU path and the reference), triton (Triton "
                "kernels, CUDA only) or auto (triton on CUDA when Triton is installed, else torch). "
                "NEEDLE_TRITON=0 in the environment means torch.", "choices": ["auto", "torch", "triton"]})
    enforce_eager: bool = field(default=False, metadata={
        "help": "Never capture CUDA graphs (they are captured for decode batches up to --max-num-seqs on "
                "the triton backend) nor compile. NEEDLE_CUDA_GRAPHS=0 in the environment means the same."})
    compilation_level: int = field(default=1, metadata={
        "choices": [0, 1], "aliases": ["-O"],
        "help": "As vLLM's -O: 1 fuses the elementwise ops between the matmuls (RMSNorm + residual add, the "
                "gated activation, RoPE) with torch.compile on CUDA when CUDA graphs are on (a one-time "
                "compile on the first steps); 0 never compiles. Ignored on the CPU."})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV cache dtype. auto: the model dtype; float16 or bfloat16: K/V pages in two bytes per "
                "value (half of an fp32 model's: on the CPU, half the bytes each decode step reads); fp8 "
                "(= fp8_e4m3) or fp8_e5m2: one byte per value (half of bf16: twice the tokens in the same "
                "memory), saturating at the format's largest value, unscaled (vLLM's default scale of 1.0). "
                "The kernels read the pages and compute in the model dtype, key summaries stay in the model "
                "dtype. Not with --cpu-kv-cache-memory.",
        "choices": ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"]})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer: a Hugging Face tokenizer directory or Hub repo (default: the model's own)."})
    generation_config: str = field(default="auto", metadata={
        "help": "Default sampling (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as "
                "max_tokens) for what a request leaves unset. auto: from the model's "
                "generation_config.json, as vLLM; vllm: none (SamplingParams' defaults); or a folder "
                "holding a generation_config.json."})

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if not self.enable_chunked_prefill:
            raise ValueError("needle always prefills in chunks (mixed with decodes, within "
                             "--max-num-batched-tokens); --no-enable-chunked-prefill cannot be honoured")
        if not 0.0 <= self.sparse_prefill_density <= 1.0:
            raise ValueError(f"--sparse-prefill-density must be in [0, 1] (0: dense), got "
                             f"{self.sparse_prefill_density}")
        if not 0.0 <= self.sparse_top_p <= 1.0:
            raise ValueError(f"--sparse-top-p must be in [0, 1] (0: off), got {self.sparse_top_p}")
        if self.sparse_top_p_floor < 0:
            raise ValueError(f"--sparse-top-p-floor must be >= 0 tokens, got {self.sparse_top_p_floor}")
        if not 0.0 <= self.sparse_drift < 1.0:
            raise ValueError(f"--sparse-drift must be in [0, 1) (a cosine similarity; 0: off), got "
                             f"{self.sparse_drift}")
        if self.sparse_drift > 0 and self.speculative_config:
            raise ValueError("--sparse-drift cannot be combined with --speculative-config: a drift "
                             "reselection depends on each position's query, which a draft cannot know, "
                             "so sparse speculation would no longer give plain sparse decoding's tokens")

    def sparse_config(self, device_type: str) -> SparseConfig:
        """The sparse backend's settings; the budget default is 1/8 of an 8K context on CPU, 2048 on CUDA."""
        return SparseConfig(
            policy=self.sparse_policy, page_score=self.sparse_page_score,
            token_budget=self.sparse_token_budget or (2048 if device_type == "cuda" else 1024),
            unit_tokens=self.sparse_unit_tokens, per_query_head=self.sparse_selection == "query-head",
            selector_interval=max(1, self.selector_interval), dense_layers=self.dense_layers,
            sink_tokens=self.sink_tokens, local_tokens=self.local_tokens,
            retrieval_local_tokens=self.retrieval_local_tokens,
            prefill_local_tokens=self.prefill_local_tokens, prefill_density=self.sparse_prefill_density,
            recall_sample=self.sparse_recall_sample,
            observation_window=max(0, self.sparse_observation_window), min_recall=self.sparse_min_recall,
            top_p=self.sparse_top_p, top_p_floor=self.sparse_top_p_floor, drift=self.sparse_drift,
            seed=self.seed)

    def kernel_backend(self, device_type: str) -> str:
        """torch or triton: the flag, with NEEDLE_TRITON=0 as an alias for torch."""
        if self.attention_backend == "triton" and device_type != "cuda":
            raise ValueError("--attention-backend triton needs a CUDA device")
        if self.attention_backend != "auto":
            return self.attention_backend
        if device_type != "cuda" or os.environ.get("NEEDLE_TRITON", "1") == "0":
            return "torch"
        from needle.attention.kernels import HAS_TRITON

        return "triton" if HAS_TRITON else "torch"

    @property
    def use_cuda_graphs(self) -> bool:
        return not self.enforce_eager and os.environ.get("NEEDLE_CUDA_GRAPHS", "1") != "0"

    @property
    def cpu_kv_cache_bytes(self) -> int | None:
        return None if self.cpu_kv_cache_memory is None else parse_bytes(self.cpu_kv_cache_memory)

    @property
    def kv_page_dtype(self) -> torch.dtype | None:
        """The K/V pages' dtype where --kv-cache-dtype sets one (None: the model's)."""
        return {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}[self.kv_cache_dtype]

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
            parser.add_argument(flag, *f.metadata.get("aliases", ()), **kwargs)

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
