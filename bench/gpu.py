"""H200 benchmarks in one command: `python bench/gpu.py [--kernels] [--e2e] [--out DIR]`.

--kernels: attention kernels alone at Llama-3.1-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16):
    paged decode dense vs sparse (4K budget, 50% streaming heads), page selection (per step) and the
    prompt-aware seed (--sparse-observation-window: once per request and layer), KV append, SDPA over
    contiguous KV as a sanity baseline, prefill attention per layer; bytes moved / measured copy bandwidth.
--block-prefill: retrieval heads' prefill attention at 32K/128K, dense (cuDNN) vs block-sparse
    (attention/kernels/block_prefill.py) at several densities, kernel alone and time to first token.
--e2e: the engine with dummy weights (`--load-format dummy`), dense vs sparse decode ms/step and tok/s at
    8K/32K/128K x batch 1/8/16, time to first token at 32K/128K, `transformers` as the outside baseline,
    and the roofline per row (weights + KV + summaries read / bandwidth).
Prints markdown tables and writes JSON (kernels.json, e2e.json) under --out. Triton-vs-torch parity is
a GPU test (tests/test_gpu_parity.py), not a benchmark. Needs `needle` importable (installed, or the
checkout linked as needle/ on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HQ, HKV, D = 32, 8, 128
PAGE, SB, UNIT = 16, 16, 64
BUDGET, SINK, LOCAL = 2048, 64, 256
DT = torch.bfloat16
CONTEXTS = (8192, 32768, 131072)
BATCHES = (1, 8, 16)


def bench(fn, *args, rep_ms: int = 200, **kwargs) -> float:
    """Median ms of fn(*args, **kwargs), timed with CUDA events."""
    import triton

    return triton.testing.do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the measured memory ceiling)."""
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = bench(b.copy_, a)
    return 2 * 2 * 1024**3 / (ms * 1e-3)


class Pool:
    """Several layers' worth of one-layer KV so repeated calls do not run out of the 60 MB L2."""

    def __init__(self, batch: int, ctx: int, gen: torch.Generator):
        pages_per_seq = ctx // PAGE
        self.num_pages = batch * pages_per_seq + 1
        per_layer = self.num_pages * PAGE * HKV * D * 2 * 2
        self.layers = max(1, math.ceil(512 * 2**20 / per_layer))
        shape = (self.layers, self.num_pages, PAGE, HKV, D)
        self.k = torch.randn(shape, dtype=DT, device="cuda")
        self.v = torch.randn(shape, dtype=DT, device="cuda")
        self.kmin = self.k.view(self.layers, self.num_pages, PAGE // SB, SB, HKV, D).amin(3)
        self.kmax = self.k.view(self.layers, self.num_pages, PAGE // SB, SB, HKV, D).amax(3)
        perm = torch.randperm(self.num_pages - 1, generator=gen)[: batch * pages_per_seq] + 1
        self.page_tables = perm.view(batch, pages_per_seq).int().cuda()
        self.ctx = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.i = 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.layers
        return self.i


def sparse_setup(batch: int, ctx: int, gen: torch.Generator):
    from needle.attention.sparse import allowed_units

    nu = ctx // UNIT
    n_sink_u, n_recent_u = SINK // UNIT, 2
    k = BUDGET // UNIT - n_sink_u - n_recent_u
    allowed = allowed_units(torch.full((batch,), ctx, device="cuda"), nu, UNIT, n_sink_u, n_recent_u)
    units = torch.stack([torch.stack([torch.randperm(nu - n_sink_u - n_recent_u, generator=gen)[:k].sort()
                                      .values + n_sink_u for _ in range(HKV)]) for _ in range(batch)])
    streaming = (torch.arange(HKV) % 2).int().cuda()  # 50% streaming KV heads
    return units.int().cuda(), streaming, allowed, k


def seed_selection(q: torch.Tensor, kcache: torch.Tensor, page_tables: torch.Tensor, ctx: int,
                   allowed: torch.Tensor, k: int, window: int = 32) -> torch.Tensor:
    """What --sparse-observation-window adds at a prefill's end, for one sequence and layer: the last
    `window` queries' attention mass over every unit (the retrieval half of the KV heads), then top-k."""
    from needle.attention.kernels.prefill import gather_context
    from needle.attention.policies.base import top_units
    from needle.attention.sparse import window_mass

    retrieval = torch.arange(0, HKV, 2, device="cuda")
    keys = gather_context(kcache, page_tables[0], ctx)[:, retrieval]
    qw = q[:1].view(1, HKV, HQ // HKV, D)[:, retrieval].expand(window, -1, -1, -1)
    mass = window_mass(qw, keys, ctx, UNIT, D ** -0.5).sum(dim=1)[:, :allowed.shape[1]]
    return top_units(mass[None], allowed[:1], k)


def kernel_rows(bw: float, rows: list[dict]) -> None:
    from needle.attention.kernels.page_select import page_scores, select_units
    from needle.attention.kernels.paged_decode import paged_decode, sparse_decode

    gen = torch.Generator().manual_seed(0)
    scale = D ** -0.5
    free = torch.cuda.mem_get_info()[0]
    for ctx in CONTEXTS:
        for batch in BATCHES:
            need = batch * ctx * HKV * D * 2 * 2 * 1.15
            if need > free * 0.8:
                rows.append({"ctx": ctx, "batch": batch, "skipped": "KV does not fit"})
                continue
            pool = Pool(batch, ctx, gen)
            q = torch.randn(batch, HQ, D, dtype=DT, device="cuda")
            units, streaming, allowed, k = sparse_setup(batch, ctx, gen)

            def dense(pool=pool, q=q):
                i = pool.next()
                return paged_decode(q, pool.k[i], pool.v[i], pool.page_tables, pool.ctx, scale)

            def sparse(pool=pool, q=q, units=units, streaming=streaming):
                i = pool.next()
                return sparse_decode(q, pool.k[i], pool.v[i], pool.page_tables, pool.ctx, units, streaming,
                                     unit_tokens=UNIT, sink=SINK, recent_units=2, stream_sink=SINK,
                                     stream_local=LOCAL, scale=scale)

            def select(pool=pool, q=q, allowed=allowed, k=k):
                i = pool.next()
                return select_units(q, pool.kmin[i], pool.kmax[i], pool.page_tables, pool.ctx, allowed, k,
                                    page_size=PAGE, unit_tokens=UNIT, shared=True)

            def score(pool=pool, q=q):
                i = pool.next()
                return page_scores(q, pool.kmin[i], pool.kmax[i], pool.page_tables, pool.ctx,
                                   page_size=PAGE, unit_tokens=UNIT, shared=True)

            kv_bytes = batch * ctx * HKV * D * 2 * 2
            row_seed = {}
            if batch == BATCHES[0]:  # prompt-aware seed: once per request and layer, at the prefill's end
                row_seed = {"seed_ms": bench(seed_selection, q, pool.k[0], pool.page_tables, ctx, allowed, k)}
            t_dense = bench(dense)
            t_sparse = bench(sparse)
            t_select = bench(select)
            t_score = bench(score)
            sparse_tokens = HKV // 2 * BUDGET + HKV // 2 * (SINK + LOCAL)
            sparse_bytes = batch * sparse_tokens * D * 2 * 2
            summary_bytes = batch * (ctx // SB) * HKV * D * 2 * 2
            row = {"ctx": ctx, "batch": batch, "dense_ms": t_dense, "dense_TBps": kv_bytes / t_dense / 1e9,
                   "dense_frac_of_copy": kv_bytes / t_dense / 1e9 / (bw / 1e12),
                   "sparse_ms": t_sparse, "sparse_TBps": sparse_bytes / t_sparse / 1e9,
                   "select_ms": t_select, "score_ms": t_score, "score_TBps": summary_bytes / t_score / 1e9,
                   "sparse_amortised_ms": t_sparse + t_select / 4,
                   "sparse_speedup": t_dense / (t_sparse + t_select / 4), **row_seed}
            # sanity baseline: torch SDPA over contiguous KV of the same size
            kc = torch.randn(batch, HKV, ctx, D, dtype=DT, device="cuda")
            vc = torch.randn_like(kc)
            q4 = q[:, :, None, :]
            row["sdpa_contig_ms"] = bench(torch.nn.functional.scaled_dot_product_attention, q4, kc, vc,
                                          enable_gqa=True)
            kc = vc = None
            if ctx == 32768 and batch == 8:  # a small sweep of launch shapes at the goal's size
                sweep = {}
                for bn in (32, 64, 128):
                    for warps in (4, 8):
                        for stages in (1, 2, 3):
                            def fn(pool=pool, q=q, bn=bn, warps=warps, stages=stages):
                                i = pool.next()
                                return paged_decode(q, pool.k[i], pool.v[i], pool.page_tables, pool.ctx,
                                                    scale, block_n=bn, num_warps=warps, num_stages=stages)
                            try:
                                sweep[f"bn{bn}_w{warps}_s{stages}"] = bench(fn, rep_ms=100)
                            except Exception as e:  # noqa: BLE001 - a shape that does not compile
                                sweep[f"bn{bn}_w{warps}_s{stages}"] = repr(e)[:80]
                row["sweep_ms"] = sweep
                best = min((v, k) for k, v in sweep.items() if isinstance(v, float))
                row["sweep_best"] = best[1]
                row["sweep_best_TBps"] = kv_bytes / best[0] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pool
            torch.cuda.empty_cache()


def append_rows(rows: list[dict]) -> None:
    from needle.attention.kernels.kv_append import kv_append

    for t in (1, 16, 2048):
        pages = 4096
        k_cache = torch.randn(pages, PAGE, HKV, D, dtype=DT, device="cuda")
        v_cache = torch.randn_like(k_cache)
        summaries = tuple(torch.randn(pages, PAGE // SB, HKV, D, dtype=DT, device="cuda") for _ in range(3))
        k = torch.randn(t, HKV, D, dtype=DT, device="cuda")
        v = torch.randn_like(k)
        if t == 2048:
            slots = torch.arange(t, device="cuda") + 5 * PAGE
        else:
            slots = torch.randperm(pages, device="cuda")[:t] * PAGE + 3
        ms = bench(kv_append, k_cache, v_cache, summaries, k, v, slots, SB)
        rows.append({"kv_append_tokens": t, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)


def timed(reps: int, fn, *args, **kwargs) -> float:
    """Mean ms over reps calls after one warm-up (for calls long enough that launch jitter is noise)."""
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def prefill_rows(rows: list[dict]) -> None:
    from needle.attention.kernels.prefill import prefill_dense, prefill_streaming

    scale = D ** -0.5
    for n in (32768, 131072):
        q = torch.randn(n, HQ, D, dtype=DT, device="cuda")
        k = torch.randn(n, HKV, D, dtype=DT, device="cuda")
        v = torch.randn_like(k)
        retr_q = torch.arange(HQ, device="cuda").view(HKV, -1)[0::2].flatten()
        strm_q = torch.arange(HQ, device="cuda").view(HKV, -1)[1::2].flatten()
        retr_kv = torch.arange(0, HKV, 2, device="cuda")
        strm_kv = torch.arange(1, HKV, 2, device="cuda")
        qr, qs = q[:, retr_q].contiguous(), q[:, strm_q].contiguous()
        kr, vr = k[:, retr_kv].contiguous(), v[:, retr_kv].contiguous()
        ks, vs = k[:, strm_kv].contiguous(), v[:, strm_kv].contiguous()
        reps = 5 if n <= 32768 else 2

        dense = timed(reps, prefill_dense, q, k, v, scale)
        retr = timed(reps, prefill_dense, qr, kr, vr, scale)
        strm = timed(reps, prefill_streaming, qs, ks, vs, scale, sink=SINK, local=2048)
        flops = 4 * n * n / 2 * HQ * D
        row = {"prefill_tokens": n, "dense_ms": dense, "dense_TFLOPs": flops / dense / 1e9,
               "retrieval_half_ms": retr, "streaming_half_ms": strm, "sparse_ms": retr + strm,
               "sparse_speedup": dense / (retr + strm)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        q = k = v = qr = qs = kr = vr = ks = vs = None
        torch.cuda.empty_cache()


def kernels(out: Path) -> dict:
    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": bw / 1e12,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "decode": [], "append": [],
              "prefill": []}
    for name, fn in (("decode", kernel_rows), ("append", append_rows), ("prefill", prefill_rows)):
        try:
            if name == "decode":
                fn(bw, result[name])
            else:
                fn(result[name])
        except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
            import traceback

            traceback.print_exc()
            result[name + "_error"] = repr(e)
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
    print_kernel_tables(result)
    return result


def print_kernel_tables(r: dict) -> None:
    print(f"\n### Attention kernels, {r['device']}, {r['date']}, copy ceiling {r['copy_TBps']:.2f} TB/s\n")
    print("| ctx | B | dense ms | dense TB/s | % of copy | SDPA contig ms | sparse ms | select ms (every 4) |"
          " sparse+select/4 speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in r["decode"]:
        if "skipped" in x:
            print(f"| {x['ctx']} | {x['batch']} | skipped: {x['skipped']} |||||||")
            continue
        print(f"| {x['ctx']} | {x['batch']} | {x['dense_ms']:.3f} | {x['dense_TBps']:.2f} | "
              f"{100 * x['dense_frac_of_copy']:.0f}% | {x['sdpa_contig_ms']:.3f} | {x['sparse_ms']:.3f} | "
              f"{x['select_ms']:.3f} | {x['sparse_speedup']:.1f}x |")
    print("\n" + ", ".join(f"prompt-aware seed at {x['ctx']}: {x['seed_ms']:.3f} ms per request and layer"
                           for x in r["decode"] if "seed_ms" in x))
    for x in r["decode"]:
        if "sweep_ms" in x:
            print(f"\nsweep at 32K x 8: best {x['sweep_best']} {x['sweep_best_TBps']:.2f} TB/s; "
                  f"{x['sweep_ms']}")
    print("\n| prefill tokens | dense ms/layer | TFLOP/s | retrieval half | streaming half | speedup |")
    print("|---|---|---|---|---|---|")
    for x in r["prefill"]:
        print(f"| {x['prefill_tokens']} | {x['dense_ms']:.1f} | {x['dense_TFLOPs']:.0f} | "
              f"{x['retrieval_half_ms']:.1f} | {x['streaming_half_ms']:.1f} | {x['sparse_speedup']:.2f}x |")
    print("\n" + ", ".join(f"append {x['kv_append_tokens']} tok: {x['ms'] * 1e3:.1f} us"
                           for x in r["append"]))


LLAMA_8B = {  # Llama-3.1-8B's config.json (architecture only; weights are random with --load-format dummy)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"}


def model_config_path(out: Path) -> str:
    repo = Path(__file__).resolve().parent.parent / "configs" / "llama-3.1-8b.json"
    if repo.exists():
        return str(repo)
    path = out / "llama-3.1-8b.json"
    path.write_text(json.dumps(LLAMA_8B))
    return str(path)


def make_engine(model: str, attention: str, kv_gib: float, max_model_len: int = 131072, **kw):
    from needle.engine.config import EngineArgs
    from needle.engine.llm_engine import LLMEngine

    args = EngineArgs(model=model, load_format="dummy", attention=attention, kv_cache_memory=f"{kv_gib}GiB",
                      max_model_len=max_model_len, enable_prefix_caching=False, streaming_ratio=0.5,
                      max_num_batched_tokens=8192,
                      sparse_recall_sample=0.0, **kw)
    return LLMEngine(args)


def fill_pool(pool) -> None:
    """Random K/V (never time on zeros) and the exact summaries of it."""
    for layer in range(pool.k.shape[0]):
        pool.k[layer].copy_(torch.randn(pool.k[layer].shape, device=pool.device))  # any page dtype (fp8)
        pool.v[layer].copy_(torch.randn(pool.v[layer].shape, device=pool.device))
        if pool.kmin is not None:
            sb = pool.spec.summary_tokens
            blocks = pool.k[layer].to(pool.kmin.dtype).view(pool.num_pages, -1, sb, pool.spec.num_kv_heads,
                                                            pool.spec.head_dim)
            pool.kmin[layer].copy_(blocks.amin(2))
            pool.kmax[layer].copy_(blocks.amax(2))
            pool.kmean[layer].copy_(blocks.mean(2))


def decode_meta(batch: int, ctx: int, page_size: int, first_page: int, device):
    """One decode step of `batch` sequences at context ctx (the new token at position ctx)."""
    from needle.attention.base import AttentionMetadata

    pages = (ctx + 1 + page_size - 1) // page_size
    tables = (torch.randperm(batch * pages).view(batch, pages) + first_page).tolist()
    return AttentionMetadata.build(list(range(batch)), [1] * batch, [ctx + 1] * batch, tables, page_size,
                                   device, ["sparse"] * batch, [BUDGET] * batch)


def decode_step_ms(engine, batch: int, ctx: int, steps: int = 24) -> float:
    """ms per decode step through the runner's path (graph when it applies), lm_head included."""
    runner = engine.runner
    meta = decode_meta(batch, ctx, engine.pool.spec.page_size, 1, engine.device)
    ids = torch.randint(0, 1000, (batch,), device=engine.device)

    def step():
        return runner.model.logits(runner.forward(ids, meta))

    with torch.inference_mode():
        for _ in range(6):  # capture + warm-up, through a reselect and a reuse step
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def ttft_seconds(engine, prompt_tokens: int, chunk: int = 8192,
                 limit_s: float | None = None) -> float | None:
    """Seconds from submitting one random prompt of `prompt_tokens` to its first token, prefilling
    `chunk` tokens a step; None past limit_s. The request is aborted on a timeout or an error."""
    from needle.scheduler.sampling_params import SamplingParams

    engine.scheduler.max_num_batched_tokens = chunk
    prompt = torch.randint(0, 100000, (prompt_tokens,)).tolist()
    rid = f"ttft-{prompt_tokens}-{chunk}-{time.monotonic_ns()}"
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    try:
        while engine.has_unfinished():
            engine.step()
            if limit_s is not None and time.perf_counter() - start > limit_s:
                engine.abort(rid)
                engine.step()
                return None
    except Exception:
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        raise
    torch.cuda.synchronize()
    return time.perf_counter() - start


def weight_bytes(engine) -> int:
    """Bytes a decode step reads of the weights: all but the embedding table (only B rows of it)."""
    m = engine.model
    return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "embed_tokens" not in n)


def kv_read_bytes(engine, mode: str, batch: int, ctx: int) -> int:
    spec = engine.pool.spec
    per_tok = spec.num_kv_heads * spec.head_dim * 2 * 2  # K and V of all KV heads, one layer
    if mode == "dense":
        return batch * ctx * per_tok * spec.num_layers
    b = engine.backend
    dense_l = b.dense_layers
    sparse_l = spec.num_layers - dense_l
    half = spec.num_kv_heads // 2
    per_head = spec.head_dim * 2 * 2
    read = half * min(ctx, BUDGET) * per_head + half * (SINK + LOCAL) * per_head
    summaries = (ctx // spec.summary_tokens) * spec.num_kv_heads * spec.head_dim * 2 * 2 / b.selector_interval
    return int(batch * (ctx * per_tok * dense_l + (read + summaries) * sparse_l))


def e2e(out: Path, bw: float, ttft_only: bool = False) -> dict:
    import gc

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"device": torch.cuda.get_device_name(), "date": date, "copy_TBps": bw / 1e12, "decode": [],
              "ttft": [], "hf": {}}
    model = model_config_path(out)
    try:
        result["hf"] = {} if ttft_only else hf_baseline()
    except Exception as e:  # noqa: BLE001
        result["hf"] = {"error": repr(e)[:300]}
    print(json.dumps(result["hf"]), flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    for mode in ("dense", "sparse"):
        engine = make_engine(model, mode, 80)
        fill_pool(engine.pool)
        wbytes = weight_bytes(engine)
        cap = engine.pool.capacity_tokens
        for ctx in CONTEXTS if not ttft_only else ():
            for batch in BATCHES:
                row = {"mode": mode, "ctx": ctx, "batch": batch}
                if batch * (ctx + 16) > cap - 64:
                    row["skipped"] = f"KV of {batch}x{ctx} tokens exceeds the {cap}-token pool"
                else:
                    try:
                        ms = decode_step_ms(engine, batch, ctx)
                        roof = (wbytes + kv_read_bytes(engine, mode, batch, ctx)) / bw * 1e3
                        row.update(ms=ms, tok_s=batch / ms * 1e3, roofline_ms=roof, vs_roofline=ms / roof)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = repr(e)[:300]
                result["decode"].append(row)
                print(json.dumps(row), flush=True)
                (out / "e2e.json").write_text(json.dumps(result, indent=1))
        ttft_seconds(engine, 9000)  # one-time costs (kernel plans, allocator growth) stay out of TTFT
        for n, chunk in ((32768, 8192), (131072 - 64, 8192), (32768, 131072), (131072 - 64, 131072)):
            # the prompt and its one new token within max_model_len; chunked or in one step
            row = {"mode": mode, "prompt": n, "chunk": chunk}
            try:
                row["ttft_s"] = ttft_seconds(engine, n, chunk)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                row["error"] = repr(e)[:300]
            result["ttft"].append(row)
            print(json.dumps(row), flush=True)
            (out / "e2e.json").write_text(json.dumps(result, indent=1))
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
    print_e2e(result)
    return result


FUSION_ROWS = (("dense", 8192, 1), ("dense", 32768, 16), ("sparse", 131072, 1), ("sparse", 32768, 16))
FP8_ROWS = (("dense", 8192, 1), ("dense", 32768, 16), ("dense", 131072, 1), ("sparse", 131072, 1),
            ("sparse", 32768, 16))


def side_by_side(out: Path, name: str, key: str, values: tuple, rows: tuple) -> list[dict]:
    """Decode ms/step of each (attention, ctx, batch) row with engine argument `key` at each of `values`,
    one engine per (attention, value), the same random KV; -> rows, also written to OUT/name.json."""
    import gc

    result = []
    model = model_config_path(out)
    for mode in ("dense", "sparse"):
        for value in values:
            engine = make_engine(model, mode, 80, **{key: value})
            fill_pool(engine.pool)
            for m, ctx, batch in rows:
                if m == mode:
                    row = {"mode": mode, "ctx": ctx, "batch": batch, key: value,
                           "capacity_tokens": engine.pool.capacity_tokens,
                           "ms": decode_step_ms(engine, batch, ctx)}
                    result.append(row)
                    print(json.dumps(row), flush=True)
            engine = None
            gc.collect()
            torch.cuda.empty_cache()
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    by = {(r["mode"], r["ctx"], r["batch"], r[key]): r for r in result}
    a, b = values
    print(f"\n| attention | ctx | batch | {key}={a} ms/step | {key}={b} ms/step | speed-up "
          "| tokens in 80 GiB |")
    print("|---|---|---|---|---|---|---|")
    for m, ctx, batch in rows:
        x, y = by[(m, ctx, batch, a)], by[(m, ctx, batch, b)]
        print(f"| {m} | {ctx // 1024}K | {batch} | {x['ms']:.2f} | {y['ms']:.2f} | "
              f"{x['ms'] / y['ms']:.2f}x | {x['capacity_tokens']} -> {y['capacity_tokens']} |")
    return result


PREFILL_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)


def block_prefill(out: Path) -> dict:
    """Retrieval heads' prefill (half the heads, as the e2e profile), one layer: the last 8192-token chunk
    of a 32K / 128K prompt and a whole 32K prompt, dense vs block selection + block-sparse attention;
    then time to first token at 128K with each density (sparse attention, one engine)."""
    import gc

    from needle.attention.kernels.block_prefill import block_sparse_prefill, prefill_blocks
    from needle.attention.kernels.prefill import prefill_dense

    scale = D ** -0.5
    result = {"device": torch.cuda.get_device_name(), "kernel": [], "ttft": [],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    hq, hkv = HQ // 2, HKV // 2
    for ctx, n in ((32768, 8192), (32768, 32768), (131072, 8192)):
        q = torch.randn(n, hq, D, dtype=DT, device="cuda")
        k = torch.randn(ctx, hkv, D, dtype=DT, device="cuda")
        v = torch.randn_like(k)
        qg = q.view(n, hkv, -1, D)
        row = {"ctx": ctx, "chunk": n, "dense_ms": timed(5, prefill_dense, q, k, v, scale)}
        for density in PREFILL_DENSITIES:
            blocks = prefill_blocks(qg, k, scale, density)
            row[f"select_ms@{density}"] = timed(5, prefill_blocks, qg, k, scale, density)
            row[f"attend_ms@{density}"] = timed(5, block_sparse_prefill, q, k, v, scale, blocks)
            row[f"blocks_read@{density}"] = int((blocks >= 0).sum()) / hkv
        full = prefill_blocks(qg, k, scale, 1.0)
        got = block_sparse_prefill(q, k, v, scale, full).float()
        want = prefill_dense(q, k, v, scale).float()
        row["rel_err_vs_dense@1.0"] = ((got - want).norm() / want.norm()).item()
        result["kernel"].append(row)
        print(json.dumps(row), flush=True)
        q = k = v = qg = blocks = full = got = want = None
        torch.cuda.empty_cache()
    (out / "block_prefill.json").write_text(json.dumps(result, indent=1))
    model = model_config_path(out)
    for mode, densities in (("dense", (0.0,)), ("sparse", (0.0, *PREFILL_DENSITIES[1:]))):
        engine = make_engine(model, mode, 40)
        ttft_seconds(engine, 9000)
        for density in densities:
            if mode == "sparse":
                engine.backend.prefill_density = density
                ttft_seconds(engine, 20000)  # this density's kernels compiled outside the timing
            row = {"mode": mode, "density": density, "prompt": 131072 - 64,
                   "ttft_s": ttft_seconds(engine, 131072 - 64)}
            result["ttft"].append(row)
            print(json.dumps(row), flush=True)
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
    (out / "block_prefill.json").write_text(json.dumps(result, indent=1))
    print(f"\n### Block-sparse prefill, retrieval heads ({hq} q / {hkv} KV heads), one layer, "
          f"{result['date']}\n")
    print("| context | chunk | dense ms | " + " | ".join(f"density {d}: select + attend ms (speed-up)"
                                                  for d in PREFILL_DENSITIES) + " |")
    print("|---|---|---|" + "---|" * len(PREFILL_DENSITIES))
    for x in result["kernel"]:
        cells = []
        for d in PREFILL_DENSITIES:
            t = x[f"select_ms@{d}"] + x[f"attend_ms@{d}"]
            cells.append(f"{x[f'select_ms@{d}']:.2f} + {x[f'attend_ms@{d}']:.2f} ({x['dense_ms'] / t:.2f}x)")
        print(f"| {x['ctx']} | {x['chunk']} | {x['dense_ms']:.2f} | " + " | ".join(cells) + " |")
    print("\n| attention | prefill density | TTFT s at 128K |\n|---|---|---|")
    for x in result["ttft"]:
        print(f"| {x['mode']} | {x['density'] or 'dense retrieval heads'} | {x['ttft_s']:.2f} |")
    return result


FAMILY_ROWS = (("qwen3-8b", 32768, (1, 4)), ("gemma-3-12b", 32768, (1, 2)))


def families(out: Path) -> list[dict]:
    """Decode ms/step of other families' shapes (configs/), dense vs sparse at 32K. Gemma 3's sliding-window
    layers run on the torch backends (the Triton kernels have no window), so its rows run eagerly."""
    import gc

    rows = []
    for name, ctx, batches in FAMILY_ROWS:
        for mode in ("dense", "sparse"):
            engine = make_engine(name, mode, 60, max_model_len=ctx + 1024)
            fill_pool(engine.pool)
            for batch in batches:
                row = {"model": name, "mode": mode, "ctx": ctx, "batch": batch, "kernels": engine.kernels}
                cap = engine.pool.capacity_tokens
                if batch * (ctx + 16) > cap - 64:
                    row["error"] = f"KV of {batch}x{ctx} tokens exceeds the {cap}-token pool"
                else:
                    row["ms"] = decode_step_ms(engine, batch, ctx)
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "families.json").write_text(json.dumps(rows, indent=1))
            engine = None
            gc.collect()
            torch.cuda.empty_cache()
    print("\n| model | ctx | batch | kernels | dense ms/step | sparse ms/step | sparse speed-up |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["model"], r["batch"], r["mode"]): r for r in rows}
    for name, ctx, batches in FAMILY_ROWS:
        for b in batches:
            d, s = by[(name, b, "dense")], by[(name, b, "sparse")]
            if "ms" in d and "ms" in s:
                print(f"| {name} | {ctx} | {b} | {s['kernels']} | {d['ms']:.2f} | {s['ms']:.2f} | "
                      f"{d['ms'] / s['ms']:.2f}x |")
            else:
                print(f"| {name} | {ctx} | {b} | {d.get('error')} {s.get('error')} ||||")
    return rows


def hf_baseline(ctx: int = 8192, new: int = 16) -> dict:
    """transformers with random weights of the same config: prefill ctx tokens, then greedy decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 100000, (1, ctx), device="cuda")
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outp = model(ids, use_cache=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        past = outp.past_key_values
        tok = outp.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up
            o = model(tok, past_key_values=past, use_cache=True)
            past = o.past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            o = model(tok, past_key_values=past, use_cache=True)
            past = o.past_key_values
            tok = o.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / new * 1e3
    return {"hf_ctx": ctx, "hf_prefill_s": prefill, "hf_decode_ms": step}


def print_e2e(r: dict) -> None:
    print(f"\n### End to end, Llama-3.1-8B shapes, dummy weights, bf16, {r['device']}, {r['date']}\n")
    hf = r.get("hf", {})
    if "hf_decode_ms" in hf:
        print(f"transformers {hf['hf_ctx']} ctx, batch 1: decode {hf['hf_decode_ms']:.1f} ms/token, "
              f"prefill {hf['hf_prefill_s']:.2f} s\n")
    print("| mode | ctx | batch | ms/step | tok/s | roofline ms | measured/roofline |")
    print("|---|---|---|---|---|---|---|")
    for x in r["decode"]:
        if "ms" in x:
            print(f"| {x['mode']} | {x['ctx']} | {x['batch']} | {x['ms']:.2f} | {x['tok_s']:.0f} | "
                  f"{x['roofline_ms']:.2f} | {x['vs_roofline']:.2f} |")
        else:
            print(f"| {x['mode']} | {x['ctx']} | {x['batch']} | {x.get('skipped') or x.get('error')} ||||")
    print("\n| mode | prompt tokens | prefill chunk | TTFT s |")
    print("|---|---|---|---|")
    for x in r["ttft"]:
        print(f"| {x['mode']} | {x['prompt']} | {x['chunk']} | {x.get('ttft_s', float('nan')):.2f} "
              f"{x.get('error', '')} |")


SMOLLM2_SHAPE = {  # SmolLM2-135M's architecture: 9 q heads over 3 KV heads (odd GQA), head_dim 64
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": True}


def profile(out: Path) -> None:
    """Where a step's GPU time goes: top kernels of one dense decode step (B=1, 8K) and of a 32K prefill."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from needle.scheduler.sampling_params import SamplingParams

    # eager, so kernels show by name; their GPU time is the same inside a graph
    engine = make_engine(model_config_path(out), "dense", 20, enforce_eager=True)
    fill_pool(engine.pool)
    decode_step_ms(engine, 1, 8192, steps=3)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_step_ms(engine, 1, 8192, steps=5)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print("decode B=1 8K x 5 (+6 warm-up) steps\n" + table)
    prompt = torch.randint(0, 100000, (32768,)).tolist()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
    table2 = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print("prefill 32K\n" + table2)
    (out / "profile.txt").write_text(table + "\n" + table2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--families", action="store_true", help="Qwen3-8B and Gemma-3-12B shapes at 32K")
    ap.add_argument("--ttft-only", action="store_true", help="with --e2e: skip the decode table")
    ap.add_argument("--fusion", action="store_true", help="decode with the elementwise ops compiled or not")
    ap.add_argument("--fp8", action="store_true", help="decode over model-dtype (auto) vs fp8 KV pages")
    ap.add_argument("--block-prefill", action="store_true",
                    help="retrieval heads' prefill, dense vs block-sparse")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    result = None
    if args.profile:
        profile(out)
        return
    if args.families:
        families(out)
        return
    if args.fusion:
        side_by_side(out, "fusion", "compilation_level", (0, 1), FUSION_ROWS)
        return
    if args.block_prefill:
        block_prefill(out)
        return
    if args.fp8:
        side_by_side(out, "fp8", "kv_cache_dtype", ("auto", "fp8"), FP8_ROWS)
        return
    if args.kernels or not args.e2e:
        result = kernels(out)
    if args.e2e:
        bw = result["copy_TBps"] * 1e12 if result else copy_bandwidth()
        e2e(out, bw, args.ttft_only)


if __name__ == "__main__":
    main()
