"""The synchronous engine: add requests, call step(), get incremental outputs and step stats."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from needle.attention.base import AttentionBackend
from needle.attention.dense import DenseBackend
from needle.engine.config import EngineArgs
from needle.engine.detokenizer import TextState
from needle.engine.loader import ModelLoadError, load_config, load_model, resolve_model
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.engine.runner import ModelRunner
from needle.engine.sampler import Sampler
from needle.engine.sampling_params import SamplingParams
from needle.engine.stats import StepStats
from needle.kvcache.block_manager import BlockManager
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.prefix_hash import chain_hash
from needle.scheduler.scheduler import Scheduler
from needle.scheduler.sequence import Sequence, Status

log = logging.getLogger("needle.engine")

CPU_KV_DEFAULT = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[TextState]
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    reported_finished: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path: Path):
    """The model's tokenizer, or None for a config-only (dummy) model: prompts must then be token ids."""
    if path.is_file() or not any(path.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        path, self.model_name = resolve_model(args.model, args.load_format)
        cfg = load_config(path, self.model_name)
        self.model_config = cfg
        if args.max_model_len and args.max_model_len > cfg.max_model_len:
            raise ModelLoadError(f"--max-model-len {args.max_model_len} exceeds the model's context "
                                 f"length {cfg.max_model_len}")
        self.max_model_len = args.max_model_len or cfg.max_model_len
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, cfg, self.dtype, self.device, args.load_format, args.seed)
        self.pool = self._build_pool()
        self.backend = self._build_backend()
        self.block_manager = BlockManager(self.pool.num_pages, args.page_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                                   on_release=lambda s: self.backend.release(s.seq_id))
        budget = args.token_budget(self.device.type)
        self.runner = ModelRunner(self.model, self.backend, args.page_size, self.device,
                                  args.attention, budget)
        self.sampler = Sampler(cfg.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(args.seed)

    def _build_pool(self) -> KVPool:
        cfg, args = self.model_config, self.args
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, args.page_size, dtype=self.dtype)
        sparse = args.attention == "sparse"
        budget = args.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - args.gpu_memory_utilization))
        return KVPool.from_budget(spec, budget or CPU_KV_DEFAULT, self.device, with_summaries=sparse)

    def _build_backend(self) -> AttentionBackend:
        if self.args.attention == "dense":
            return DenseBackend(self.pool)
        from needle.attention.sparse import build_sparse_backend

        return build_sparse_backend(self.pool, self.args, self.model_config)

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "kv_capacity_tokens": self.pool.capacity_tokens,
            "max_model_len": self.max_model_len,
            "attention": self.args.attention
            + (f" ({self.args.sparse_policy}, budget {self.runner.default_budget} tokens)"
               if self.args.attention == "sparse" else ""),
            "prefix_caching": self.args.enable_prefix_caching,
        }

    # -- requests ---------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token ids instead of text")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return list(prompt)

    def check_token_ids(self, params: SamplingParams) -> None:
        """Token ids inside sampling settings must exist, or one request would break the shared step."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= int(t) < vocab for t in ids):
                raise ValueError(f"{name} token ids must be in [0, {vocab})")

    def check_length(self, num_prompt: int, params: SamplingParams) -> None:
        """vLLM's wording: clients parse this message."""
        completion = params.max_tokens or 0
        if num_prompt + completion > self.max_model_len or num_prompt >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt + completion} tokens ({num_prompt} in the messages, {completion} "
                f"in the completion). Please reduce the length of the messages or completion.")
        if num_prompt + completion > self.pool.capacity_tokens:
            raise ValueError(f"the request needs {num_prompt + completion} tokens of KV cache but the "
                             f"cache holds {self.pool.capacity_tokens}")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = self.encode_prompt(prompt)
        self.check_length(len(ids), params)
        self.check_token_ids(params)
        arrival = time.monotonic() if arrival is None else arrival
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), params, arrival, first_sibling=seqs[0] if seqs else None)
            seed = params.seed + i if params.seed is not None else self.rng.getrandbits(63)
            seq.generator = torch.Generator().manual_seed(seed)
            seq.pages.salt = chain_hash(None, [ord(c) for c in self.runner.attention_key(seq)])
            seqs.append(seq)
        texts = [TextState.for_prompt(len(ids)) for _ in seqs]
        self.requests[request_id] = Request(request_id, prompt if isinstance(prompt, str) else None,
                                            ids, params, seqs, texts, arrival)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        batch = self.scheduler.schedule()
        stats = StepStats(num_preemptions=batch.num_preemptions,
                          prefix_cache_queries=batch.prefix_cache_queries,
                          prefix_cache_hits=batch.prefix_cache_hits)
        now = time.monotonic()
        if batch.seqs:
            for seq in batch.seqs:
                req = self.requests[seq.request_id]
                req.first_scheduled = req.first_scheduled or now
            logits, emitting = self.runner.execute(batch)
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                stats.num_prompt_tokens += max(min(seq.num_computed + n, seq.num_prompt_tokens)
                                               - seq.num_computed, 0)
                seq.num_computed += n
                self.block_manager.commit_full_pages(seq.pages, seq.token_ids, seq.num_computed)
            if emitting:
                tokens = self.sampler(logits, emitting)
                for seq, token in zip(emitting, tokens, strict=True):
                    self._append_token(seq, token)
                stats.num_generation_tokens = len(emitting)
        drain = getattr(self.backend, "drain_stats", None)
        if drain is not None:
            drain(stats)
        outputs = self.collect_outputs()
        return outputs, self.gauges(stats)

    def gauges(self, stats: StepStats | None = None) -> StepStats:
        """Fill the gauge fields (queue lengths, cache usage) of a step's stats."""
        stats = stats or StepStats()
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.block_manager.usage
        return stats

    def _append_token(self, seq: Sequence, token: int) -> None:
        req = self.requests[seq.request_id]
        req.first_token = req.first_token or time.monotonic()
        seq.token_ids.append(token)
        p = seq.params
        text = req.texts[seq.index]
        new_text = text.append(self.tokenizer, seq.token_ids, p.skip_special_tokens)
        if seq.num_output >= p.min_tokens:
            if not p.ignore_eos and token in self.model_config.eos_token_ids:
                return self.scheduler.finish(seq, "stop")
            if token in p.stop_token_ids:
                return self.scheduler.finish(seq, "stop", token)
            stop = text.find_stop(p.stop, len(new_text), p.include_stop_str_in_output)
            if stop is not None:
                return self.scheduler.finish(seq, "stop", stop)
        if (p.max_tokens is not None and seq.num_output >= p.max_tokens) or len(seq) >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for req in list(self.requests.values()):
            changed = []
            for seq, text in zip(req.seqs, req.texts, strict=True):
                if seq.index in req.reported_finished:
                    continue
                new_ids = seq.output_ids[text.emitted_tokens:]
                if not new_ids and not seq.is_finished:
                    continue
                text.emitted_tokens += len(new_ids)
                logprobs = None
                if seq.params.logprobs is not None:
                    logprobs = seq.logprobs[text.emitted_logprobs:]
                    text.emitted_logprobs = len(seq.logprobs)
                delta = text.take_delta(seq.params.stop, seq.is_finished)
                changed.append(CompletionOutput(seq.index, delta, new_ids, seq.finish_reason,
                                                seq.stop_reason, logprobs))
                if seq.is_finished:
                    req.reported_finished.add(seq.index)
            if not changed:
                continue
            done = req.finished
            if done:
                req.finished_at = time.monotonic()
                del self.requests[req.request_id]
            outputs.append(RequestOutput(
                req.request_id, req.prompt, req.prompt_ids, changed, done,
                metrics={"arrival_time": req.arrival, "first_scheduled_time": req.first_scheduled or 0.0,
                         "first_token_time": req.first_token or 0.0,
                         "finished_time": req.finished_at or 0.0},
                num_cached_tokens=req.seqs[0].num_cached))
        return outputs

    def fail_running(self) -> list[str]:
        """After a step raised: end every request that was in flight, so the engine can go on."""
        failed = [rid for rid, r in self.requests.items()
                  if any(s.status is Status.RUNNING for s in r.seqs)]
        for rid in failed:
            self.abort(rid)
            del self.requests[rid]
        return failed
