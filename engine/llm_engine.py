"""The synchronous engine: add requests, call step(), get incremental outputs and step stats."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

import torch

from needle.attention import build_backend
from needle.attention.base import AttentionBackend
from needle.attention.head_profile import resolve_profile
from needle.engine.config import EngineArgs
from needle.engine.cpu_layer import fuse_decoder_layers
from needle.engine.cpu_pointwise import native_pointwise
from needle.engine.cuda_graph import CudaGraphRunner
from needle.engine.detokenizer import TextState
from needle.engine.distributed import RankAddress, TensorParallel
from needle.engine.distributed import refusal as tensor_parallel_refusal
from needle.engine.generation_defaults import generation_defaults
from needle.engine.loader import ModelLoadError, load_config, load_model, resolve_model
from needle.engine.models.layers import compile_pointwise
from needle.engine.offload import build_tiers, describe_sizes, offload_refusal, place_values
from needle.engine.output_processor import OutputProcessor, Request
from needle.engine.outputs import RequestOutput
from needle.engine.prompt_logprobs import private_salt, record
from needle.engine.quantization import quantize
from needle.engine.runner import ModelRunner
from needle.engine.sampler import Sampler
from needle.engine.spec_decode import SpecDecoder, SpeculativeConfig, build_drafter, step_shape
from needle.engine.stats import StepStats
from needle.engine.structured_output import Grammars
from needle.engine.validation import RequestError, RequestLimits, validate_request
from needle.kvcache.page_allocator import PageAllocator
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.prefix_hash import chain_hash
from needle.scheduler.sampling_params import SamplingParams
from needle.scheduler.scheduler import Scheduler
from needle.scheduler.sequence import Sequence, Status

log = logging.getLogger("needle.engine")

CPU_KV_DEFAULT = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path: Path, override: str | None = None):
    """The model's tokenizer (or --tokenizer's), or None for a config-only (dummy) model: prompts must
    then be token ids."""
    from transformers import AutoTokenizer

    if override is not None:
        try:
            return AutoTokenizer.from_pretrained(override)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"--tokenizer {override}: cannot load a tokenizer from it ({err})") from None
    if path.is_file() or not any(path.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, args: EngineArgs, rank: RankAddress | None = None):
        """`rank`: this process is that tensor-parallel rank (> 0), started by rank 0's engine."""
        self.args = args
        device = resolve_device(args.device)
        if (refusal := tensor_parallel_refusal(args, device.type)) is not None:
            raise ModelLoadError(refusal)
        self.dtype = resolve_dtype(args.dtype, device)
        path, self.model_name = resolve_model(args.model, args.load_format, args.revision, args.download_dir)
        cfg = load_config(path, self.model_name)
        self.model_config = cfg
        # This rank's heads and MLP (all of them without tensor parallelism); checked before ranks start.
        self.shard_config = cfg.shard(0 if rank is None else rank.rank, args.tensor_parallel_size)
        self.ranks: TensorParallel | None = None
        if args.tensor_parallel_size > 1:
            device = TensorParallel.rank_device(device, self.shard_config.tp_rank)
            self.ranks = TensorParallel.launch(args, device) if rank is None else TensorParallel(rank, device)
            self.ranks.share_cpu()
        self.device = device
        if args.max_model_len and args.max_model_len > cfg.max_model_len:
            raise ModelLoadError(f"--max-model-len {args.max_model_len} exceeds the model's context "
                                 f"length {cfg.max_model_len}")
        self.max_model_len = args.max_model_len or cfg.max_model_len
        if args.kv_page_dtype is not None and args.cpu_kv_cache_memory is not None:
            raise ModelLoadError(f"--kv-cache-dtype {args.kv_cache_dtype} is not available with "
                                 "--cpu-kv-cache-memory: the host value tier keeps model-dtype pages; "
                                 "use --kv-cache-dtype auto")
        self.tokenizer = load_tokenizer(path, args.tokenizer)
        self.sampling_defaults = generation_defaults(args.generation_config, path)
        self.model = quantize(load_model(path, self.shard_config, self.dtype, self.device, args.load_format,
                                         args.seed), args.quantization, self.device)
        if self.ranks is not None:
            self.ranks.reduce_after_row_parallel_layers(self.model)
        if self.device.type == "cpu" and native_pointwise(self.model) and args.quantization == "int4":
            log.info("int4 decode: %d of %d layers run as one C++ step each", fuse_decoder_layers(self.model),
                     cfg.num_layers)
        self.spec_config = SpeculativeConfig.parse(args.speculative_config)
        self.sparse_config = args.sparse_config(self.device.type)
        self.tiers = None
        if args.cpu_kv_cache_memory is not None and (refusal := offload_refusal(args, cfg.windowed)):
            raise ModelLoadError(refusal)
        self.head_profile = None if not self.keeps_summaries else resolve_profile(
            args.head_profile, self.model_name, cfg.identity, cfg.num_layers, cfg.num_kv_heads,
            args.streaming_ratio)  # resolved once: the offload tiers and the backends read it
        self.rank_profile = self.head_profile if self.head_profile is None else \
            self.head_profile.shard(self.shard_config.tp_rank, self.shard_config.tp_size)  # this rank's heads
        self.pool = self._build_pool()
        self.kernels = args.kernel_backend(self.device.type)
        self.backend = self._build_backend()
        if self.tiers is not None:
            self.backend.tiers = self.tiers
        window = self.sparse_config.observation_window if args.attention == "sparse" else 0
        self.allocator = PageAllocator(self.pool.num_pages, args.page_size, args.enable_prefix_caching,
                                       self.tiers, uncached_tail=max(1, window))  # the seed's queries run
        self.scheduler = Scheduler(self.allocator, args.max_num_seqs, args.max_num_batched_tokens,
                                   on_release=self._on_release)
        graphs = None
        if self.device.type == "cuda" and self.kernels == "triton" and args.use_cuda_graphs:
            if args.compilation_level > 0:
                compile_pointwise(self.model)  # compiled on the first steps, then captured with them
            verify = 0 if self.spec_config is None else self.spec_config.num_speculative_tokens
            graphs = CudaGraphRunner(self.model, self.backend, self.device, args.max_num_seqs, 1 + verify)
        self.runner = ModelRunner(self.model, self.backend, args.page_size, self.device, args.attention,
                                  self.sparse_config.token_budget, graphs, self.tiers, self.ranks)
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size, cfg.eos_token_ids)
        self.sampler = Sampler(cfg.eos_token_ids, self.grammars)
        self.outputs = OutputProcessor(self.tokenizer, cfg.eos_token_ids, self.max_model_len)
        capacity = self.pool.capacity_tokens  # with offload, a prompt prefills with all its values resident
        if self.tiers is not None:
            capacity = min(capacity, self.tiers.sizes.resident_slots * args.page_size)
        self.limits = RequestLimits(cfg.vocab_size, self.max_model_len, capacity, args.attention,
                                    args.max_logprobs)
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(args.seed)
        self.spec: SpecDecoder | None = None
        if self.spec_config is not None:
            self.spec = SpecDecoder(self.spec_config, build_drafter(self.spec_config, self), self.sampler,
                                    self.allocator, self.max_model_len, self.runner)

    def _build_pool(self) -> KVPool:
        cfg, args = self.shard_config, self.args
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, args.page_size, dtype=self.dtype,
                           kv_dtype=args.kv_page_dtype)
        sparse = self.keeps_summaries
        budget = args.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - args.gpu_memory_utilization))
        if self.ranks is not None:  # the same pages on every rank: as many as the tightest one holds
            budget = self.ranks.smallest(budget or CPU_KV_DEFAULT)
        if args.cpu_kv_cache_memory is not None:
            pool, self.tiers = build_tiers(spec, args, self.sparse_config, self.head_profile,
                                           cfg.num_heads // cfg.num_kv_heads, self.device,
                                           budget or CPU_KV_DEFAULT, self.max_model_len)
            return pool
        return KVPool.from_budget(spec, budget or CPU_KV_DEFAULT, self.device, with_summaries=sparse)

    def _build_backend(self) -> AttentionBackend:
        cfg = self.shard_config
        # A dense server drafting with self_sparse runs the sparse backend with every sequence in dense
        # mode: the same attention, and the key summaries the draft's page selection reads stay exact.
        mode = "sparse" if self.keeps_summaries else "dense"
        return build_backend(self.pool, mode, self.kernels, self.sparse_config, self.rank_profile,
                             cfg.num_heads, cfg.num_kv_heads, offload=self.tiers is not None)

    @property
    def keeps_summaries(self) -> bool:
        spec = self.spec_config
        return self.args.attention == "sparse" or (spec is not None and spec.method == "self_sparse")

    def draft_backend(self, budget: int) -> AttentionBackend:
        """A second sparse backend over the same pool, at the draft budget (self_sparse drafting)."""
        cfg = self.shard_config
        config = dataclasses.replace(self.sparse_config, token_budget=budget, recall_sample=0.0,
                                     min_recall=0.0)  # verification keeps drafts lossless: no guard
        return build_backend(self.pool, "sparse", self.kernels, config, self.rank_profile, cfg.num_heads,
                             cfg.num_kv_heads)

    def _on_release(self, seq: Sequence) -> None:
        self.runner.release(seq.seq_id)
        if seq.is_finished:  # a preempted sequence keeps its tokens, so its grammar state stays
            self.grammars.release(seq)
        if self.spec is not None:
            self.spec.release(seq.seq_id)

    def set_backend(self, backend: AttentionBackend) -> None:
        """Run later steps on another backend over the same pool (calibration probes, benchmarks); the
        scheduler's release hook follows, as it calls whichever backend is current."""
        self.backend = backend
        self.runner.set_backend(backend)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def describe(self) -> dict:
        return {
            "model": self.model_name,
            "dtype": str(self.dtype).removeprefix("torch.")
            + ("" if self.args.quantization == "none" else f", {self.args.quantization} weights"),
            "device": str(self.device) if self.ranks is None else
            f"{self.device.type} x {self.ranks.size} (tensor parallel)",
            "kv_capacity_tokens": self.pool.capacity_tokens,
            "kv_cache_dtype": str(self.pool.spec.page_dtype).removeprefix("torch."),
            "page_size": self.args.page_size,
            "num_pages": self.pool.num_pages,
            "max_model_len": self.max_model_len,
            "attention": self.args.attention
            + (f" ({self.args.sparse_policy}, budget {self.sparse_config.token_budget} tokens)"
               if self.args.attention == "sparse" else "") + f", {self.kernels} kernels"
            + (", CUDA graphs" if self.runner.graphs is not None else "")
            + ("" if self.tiers is None else ", values offloaded: " + describe_sizes(
                self.tiers.sizes, self.args.page_size, self.tiers.pin_seconds)),
            "prefix_caching": self.args.enable_prefix_caching,
            "max_concurrency": self.pool.capacity_tokens // self.max_model_len,  # sequences at full length
            "head_profile": "none (dense)" if self.head_profile is None else
            f"{self.head_profile.model} ({self.head_profile.streaming_ratio:.0%} streaming heads)",
            "speculative": None if self.spec_config is None else
            f"{self.spec_config.method}, K={self.spec_config.num_speculative_tokens}"
            + (", goodput" if self.spec_config.dynamic else ", fixed"),
            "features": self.features(),
        }

    def features(self) -> dict[str, dict[str, str]]:
        """The optional mechanisms that are on, with their settings (the dashboard shows their rows)."""
        on: dict[str, dict[str, str]] = {}
        if self.args.attention == "sparse":
            on["sparse_attention"] = {"policy": self.args.sparse_policy,
                                      "token_budget": str(self.sparse_config.token_budget)}
        spec = self.spec_config
        if spec is not None:
            on["speculative_decoding"] = {"method": spec.method,
                                          "num_speculative_tokens": str(spec.num_speculative_tokens)}
        if self.tiers is not None:
            on["kv_offload"] = {"cpu_kv_cache_memory": str(self.args.cpu_kv_cache_memory)}
        return on

    # -- requests ---------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Text -> token ids (ids pass through; add_request checks them)."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids instead of text", param="prompt")
        return self.tokenizer.encode(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival: float | None = None, prompt_text: str | None = None,
                    group: str | None = None) -> None:
        """Validate (RequestError when refused) and queue one request. `prompt_text` is the text of a
        prompt given as ids, reported back in its outputs; `group` the API request it is part of (one
        per prompt of a multi-prompt request), over which the scheduler shares batch slots."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        ids = self.encode_prompt(prompt)
        validate_request(ids, params, self.limits)
        budget = params.attention.token_budget if params.attention else None
        if self.tiers is not None and budget and budget > self.sparse_config.token_budget:
            raise RequestError(f"attention.token_budget {budget} exceeds this server's "
                               f"{self.sparse_config.token_budget}, for which its value cache is sized "
                               "(--cpu-kv-cache-memory)", param="attention.token_budget")
        spec = params.structured_outputs
        grammar = None if spec is None else self.grammars.compile(spec)
        arrival = time.monotonic() if arrival is None else arrival
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), params, arrival, first_sibling=seqs[0] if seqs else None,
                           group=group or request_id)
            seed = (params.seed + i) % 2**64 if params.seed is not None else self.rng.getrandbits(63)
            seq.generator = torch.Generator().manual_seed(seed)
            seq.pages.salt = chain_hash(None, [ord(c) for c in self.runner.attention_key(seq)])
            if params.prompt_logprobs is not None:  # every prompt position must run: no shared prefix
                seq.pages.salt = private_salt(seq.pages.salt, seqs[0] if seqs else seq)
            if grammar is not None:
                self.grammars.add(seq, grammar)
            seqs.append(seq)
        texts = [TextState.for_prompt(len(ids)) for _ in seqs]
        text = prompt if isinstance(prompt, str) else prompt_text
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, texts, arrival)
        if params.prompt_logprobs is not None:
            self.requests[request_id].prompt_logprobs = [None] * len(ids)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def fail_request(self, request_id: str, error: str) -> None:
        """End a request whose own sequence faulted; its output carries `error`, nothing else is touched."""
        req = self.requests.get(request_id)
        if req is None:
            return
        req.error = req.error or error
        self.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def check_ranks(self) -> None:
        """RankLost when a tensor-parallel rank has died (the server's engine loop asks while idle too)."""
        if self.ranks is not None:
            self.ranks.check_alive()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do for one process)."""
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = self.runner.ranks = None

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        start = time.perf_counter()
        spec, shape = self.spec, None
        if spec is not None:
            spec.plan(self.scheduler.running)
        batch = self.scheduler.schedule()
        stats = StepStats(num_preemptions=batch.num_preemptions,
                          prefix_cache_queries=batch.prefix_cache_queries,
                          prefix_cache_hits=batch.prefix_cache_hits)
        now = time.monotonic()
        if batch.seqs:
            for seq in batch.seqs:
                req = self.requests[seq.request_id]
                req.first_scheduled = req.first_scheduled or now
            if spec is not None:
                spec.propose(batch)
                shape = step_shape(batch)
            if self.tiers is not None:
                place_values(self.tiers, self.backend, self.scheduler.running, self.runner.attention_of)
            logits, emitting, prompt_rows = self.runner.execute(batch)
            for rows in prompt_rows:
                record(self.model.logits, rows, self.requests[rows.seq.request_id].prompt_logprobs)
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                stats.num_prompt_tokens += max(min(seq.num_computed + n, seq.num_prompt_tokens)
                                               - seq.num_computed, 0)
                seq.num_computed += n - len(seq.draft_ids)  # drafts count once verification keeps them
                self.allocator.commit_full_pages(seq.pages, seq.token_ids, seq.num_computed)
            if emitting and spec is not None:
                stats.num_generation_tokens = spec.emit(
                    logits, emitting, self._append_token,
                    lambda seq: self.fail_request(seq.request_id, seq.error or "sampling failed"))
            elif emitting:
                tokens = self.sampler(logits, emitting)
                for seq, token in zip(emitting, tokens, strict=True):
                    if token is None:
                        self.fail_request(seq.request_id, seq.error or "sampling failed")
                    elif not seq.is_finished:  # a sibling's fault may have ended it
                        self._append_token(seq, token)
                stats.num_generation_tokens = sum(t is not None for t in tokens)
        if spec is not None:
            stats.spec = spec.finish(batch, time.perf_counter() - start, shape)
        stats.attention = self.backend.drain_stats()
        if self.tiers is not None:
            stats.offload = self.tiers.drain_stats()
            stats.cpu_kv_cache_usage = self.tiers.host_usage
        outputs = self.collect_outputs()
        return outputs, self.gauges(stats)

    def gauges(self, stats: StepStats | None = None) -> StepStats:
        """Fill the gauge fields (queue lengths, cache usage) of a step's stats."""
        stats = stats or StepStats()
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.allocator.usage
        return stats

    def _append_token(self, seq: Sequence, token: int) -> bool:
        """Append one sampled token and run the stop checks; -> whether the sequence finished on it."""
        seq.token_ids.append(token)
        self.grammars.accept(seq, token)
        end = self.outputs.finish_reason(self.requests[seq.request_id], seq)
        if end is not None:
            self.scheduler.finish(seq, *end)
        return end is not None

    def collect_outputs(self) -> list[RequestOutput]:
        return self.outputs.collect(self.requests)

    def fail_running(self) -> list[str]:
        """After a step raised: end every request that was in flight, so the engine can go on."""
        failed = [rid for rid, r in self.requests.items()
                  if any(s.status is Status.RUNNING for s in r.seqs)]
        for rid in failed:
            self.abort(rid)
            del self.requests[rid]
        return failed
