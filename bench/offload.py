"""Value offload on one H200: `python bench/offload.py --out DIR` (about 6 minutes); `--cpu`: the bundled
SmolLM2 with its real weights on the CPU, where the "host" tier is a second CPU pool.

Llama-3.1-8B shapes, dummy weights, bf16, the same device KV budget (--kv-gib) for every mode. At 64K
and 128K of context:
  dense, Triton + CUDA graphs, at the largest batch its pool holds;
  sparse without offload, Triton + CUDA graphs, at its largest batch;
  sparse + offload (--cpu-kv-cache-memory, Triton kernels, eager), at batch 8, 16 and the largest that the
  device (keys, summaries, resident values, value caches) and the host tier (--host-gib) hold.
Decode rows time runner.forward over sequences at the context (gpu.py's method); an offload row first
places each sequence's values as the engine does after its prefill (sinks and window resident, the rest
copied to the host), then reports the value-cache hit rate and host->device bytes per step over the
normal schedule (reselect every 4 steps), and ms/step when every selection is kept (no copies). TTFT is
one prompt through the engine (chunks of 8192; cut off at 45 s,
shown as nan). The host tier's pinned allocation is timed at start-up.
Dummy weights make selections change more between reselections than a trained model's would, so the
hit rates are a lower bound; --cpu measures them with real weights on natural text (4 sequences of 3,000
tokens of stdlib source, 32 greedy tokens each, with and without offload: decode ms/step, hit rate, bytes
per step, and whether the tokens are identical). Writes offload.md (the table) and offload.json under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: the engine set-up and decode timing shared with it)

CONTEXTS = (65536, 131072)
OFFLOAD_BATCHES = (8, 16)
MAX_BATCH = {65536: 20, 131072: 10}  # the offload engine's --max-num-seqs (sizes its value caches)


def free_memory() -> None:
    """Give back device memory and the pinned host blocks torch caches (the next tier needs them)."""
    gc.collect()
    torch.cuda.empty_cache()
    empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def largest_batch(capacity_tokens: int, ctx: int) -> int:
    return (capacity_tokens - 64) // (ctx + 16)


def baseline_rows(model: str, mode: str, kv_gib: float, rows: list[dict]) -> None:
    engine = gpu.make_engine(model, mode, kv_gib)
    gpu.fill_pool(engine.pool)
    gpu.ttft_seconds(engine, 9000)  # one-time costs (kernel plans, allocator growth) stay out of TTFT
    for ctx in CONTEXTS:
        batch = largest_batch(engine.pool.capacity_tokens, ctx)
        row = {"mode": mode, "ctx": ctx, "batch": batch}
        ms = gpu.decode_step_ms(engine, batch, ctx)
        row.update(ms=ms, tok_s=batch / ms * 1e3, ttft_s=gpu.ttft_seconds(engine, ctx - 64))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del engine
    free_memory()


def place_as_after_prefill(engine, batch: int, ctx: int) -> tuple[list[list[int]], float]:
    """Page tables for `batch` sequences of ctx tokens (+ the new one), every page handed out as a prefill
    would, then moved as place_values moves it once the sequence decodes; -> (tables, seconds moving)."""
    tiers, ps = engine.tiers, engine.pool.spec.page_size
    pages = ctx // ps + 1
    ids = torch.randperm(engine.pool.num_pages)[: batch * pages].view(batch, pages).tolist()
    head, first = engine.backend.resident_span(ctx + 1, "sparse", 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for table in ids:
        for page in table:
            tiers.on_fresh(page)
        tiers.offload(table[head:first])
    torch.cuda.synchronize()
    return ids, time.perf_counter() - start


def release(engine, tables: list[list[int]], seq_ids: list[int]) -> None:
    for table in tables:
        for page in table:
            engine.tiers.on_free(page, cached=False)
    for sid in seq_ids:
        engine.backend.release(sid)
    engine.tiers.poll(wait=True)
    engine.tiers.poll()


def offload_steps(engine, meta, ids, steps: int) -> tuple[float, dict]:
    runner = engine.runner
    torch.cuda.synchronize()
    engine.tiers.drain_stats()
    start = time.perf_counter()
    for _ in range(steps):
        runner.model.logits(runner.forward(ids, meta))
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    s = engine.tiers.drain_stats()
    lookups = s.hits + s.misses
    return ms, {"hit_rate": s.hits / lookups if lookups else 1.0,
                "h2d_MB_step": s.bytes_to_device / steps / 1e6,
                "copy_ms_step": s.copy_seconds / steps * 1e3}


def offload_rows(model: str, ctx: int, kv_gib: float, host_gib: float, rows: list[dict],
                 pinned: list[dict]) -> None:
    from needle.attention.base import AttentionMetadata

    engine = gpu.make_engine(model, "sparse", kv_gib, cpu_kv_cache_memory=f"{host_gib}GiB",
                             max_num_seqs=MAX_BATCH[ctx])
    tiers = engine.tiers
    pinned.append({"ctx": ctx, "host_GiB": tiers.host.numel() * tiers.host.element_size() / 2**30,
                   "seconds": tiers.pin_seconds})
    print(json.dumps(pinned[-1]), flush=True)
    gpu.fill_pool(engine.pool)
    ps = engine.pool.spec.page_size
    pages = ctx // ps + 1
    head, first = engine.backend.resident_span(ctx + 1, "sparse", 0)
    fit = min(MAX_BATCH[ctx], engine.pool.num_pages // pages, tiers.sizes.host_pages // (first - head))
    meta = None
    first_row = len(rows)
    for batch in sorted({*OFFLOAD_BATCHES, fit}):
        row = {"mode": "sparse+offload", "ctx": ctx, "batch": batch}
        if batch > fit:
            row["skipped"] = f"{batch} x {ctx} tokens exceed what device keys / host tier hold (max {fit})"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        tables, move_s = place_as_after_prefill(engine, batch, ctx)
        seq_ids = [10_000 * ctx + i for i in range(batch)]
        meta = AttentionMetadata.build(seq_ids, [1] * batch, [ctx + 1] * batch, tables, ps, engine.device,
                                       ["sparse"] * batch, [gpu.BUDGET] * batch,
                                       value_tables=[tiers.value_table(t) for t in tables],
                                       value_layers_from=tiers.first_layer)
        ids = torch.randint(0, 1000, (batch,), device=engine.device)
        with torch.inference_mode():
            offload_steps(engine, meta, ids, 8)  # warm-up, through reselect and reuse steps
            ms, copies = offload_steps(engine, meta, ids, 24)
            interval = engine.backend.selector_interval
            engine.backend.selector_interval = 10**9  # keep every selection: all hits, no copies
            ms_kept, _ = offload_steps(engine, meta, ids, 12)
            engine.backend.selector_interval = interval
        row.update(ms=ms, tok_s=batch / ms * 1e3, ms_no_copies=ms_kept, move_to_host_s=move_s, **copies)
        release(engine, tables, seq_ids)
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:  # after the decode rows: the torch prefill is the slow part (time-limited; it may run out of memory)
        gpu.ttft_seconds(engine, 9000)
        seconds = gpu.ttft_seconds(engine, ctx - 64, limit_s=45.0)
        rows[first_row]["ttft_s"] = seconds if seconds is not None else float("nan")
    except torch.OutOfMemoryError as e:
        seconds = repr(e)[:200]
    print(json.dumps({"ctx": ctx, "offload_ttft_s": seconds}), flush=True)
    del engine, tiers, meta
    free_memory()


def table(rows: list[dict], pinned: list[dict]) -> str:
    same = any("identical" in r for r in rows)
    lines = ["| mode | context | batch | decode tok/s | ms/step | ms/step, no copies | hit rate | "
             "H2D MB/step | copy ms/step | TTFT s |" + (" tokens identical |" if same else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if same else "")]
    fmt = lambda r, k, f: f.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['ctx']} | {r['batch']} | {r['skipped']} |||||||")
            continue
        lines.append(f"| {r['mode']} | {r['ctx']} | {r['batch']} | {r['tok_s']:.1f} | {r['ms']:.1f} | "
                     f"{fmt(r, 'ms_no_copies', '{:.1f}')} | {fmt(r, 'hit_rate', '{:.1%}')} | "
                     f"{fmt(r, 'h2d_MB_step', '{:.0f}')} | {fmt(r, 'copy_ms_step', '{:.1f}')} | "
                     f"{fmt(r, 'ttft_s', '{:.1f}')} |"
                     + (f" {'yes' if r.get('identical') else '-' if 'identical' not in r else 'NO'} |"
                        if same else ""))
    if pinned:
        lines += ["", "| host tier for | pinned GiB | allocation s |", "|---|---|---|"]
        lines += [f"| {p['ctx']} | {p['host_GiB']:.1f} | {p['seconds']:.1f} |" for p in pinned]
    return "\n".join(lines) + "\n"


def cpu_rows(out: Path) -> None:
    from texts import long_prompt

    from needle.engine.config import EngineArgs
    from needle.engine.llm_engine import LLMEngine
    from needle.scheduler.sampling_params import SamplingParams

    rows, tokens = [], []
    for host in (None, "256MiB"):
        engine = LLMEngine(EngineArgs(device="cpu", attention="sparse", max_model_len=4096, max_num_seqs=4,
                                      kv_cache_memory="1GiB", cpu_kv_cache_memory=host,
                                      sparse_recall_sample=0.0))
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        for i in range(4):
            engine.add_request(str(i), long_prompt(engine.tokenizer, 3000, offset=40000 * i), params)
        got: dict[str, list[int]] = {}
        decode_s, steps, hits, misses, h2d, copy_s = 0.0, 0, 0, 0, 0, 0.0
        while engine.has_unfinished():
            start = time.perf_counter()
            outputs, stats = engine.step()
            if stats.num_prompt_tokens == 0 and stats.num_generation_tokens == 4:
                decode_s += time.perf_counter() - start
                steps += 1
                if stats.offload is not None:
                    hits, misses = hits + stats.offload.hits, misses + stats.offload.misses
                    h2d, copy_s = h2d + stats.offload.bytes_to_device, copy_s + stats.offload.copy_seconds
            for o in outputs:
                got.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        tokens.append(got)
        row = {"mode": "sparse+offload" if host else "sparse", "ctx": 3000, "batch": 4,
               "ms": decode_s / steps * 1e3, "tok_s": 4 * steps / decode_s}
        if host:
            row.update(hit_rate=hits / max(hits + misses, 1), h2d_MB_step=h2d / steps / 1e6,
                       copy_ms_step=copy_s / steps * 1e3, identical=tokens[0] == tokens[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    stamp = f"CPU ({torch.get_num_threads()} threads), bundled SmolLM2-135M, {time.strftime('%Y-%m-%d')}"
    (out / "offload.md").write_text(f"{stamp}\n\n" + table(rows, []))
    print(table(rows, []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--kv-gib", type=float, default=100.0, help="device KV budget of every mode")
    ap.add_argument("--host-gib", type=float, default=64.0, help="host value tier of the offload rows")
    ap.add_argument("--cpu", action="store_true", help="the bundled model on the CPU, real weights")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        cpu_rows(out)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/offload.py needs a CUDA device (or --cpu)")
    model = gpu.model_config_path(out)
    rows: list[dict] = []
    pinned: list[dict] = []
    stamp = {"device": torch.cuda.get_device_name(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for step in (lambda: baseline_rows(model, "dense", args.kv_gib, rows),
                 lambda: baseline_rows(model, "sparse", args.kv_gib, rows),
                 *[lambda c=c: offload_rows(model, c, args.kv_gib, args.host_gib, rows, pinned)
                   for c in CONTEXTS]):
        try:
            step()
        except Exception as e:  # noqa: BLE001  (a failed part leaves the others' rows)
            import traceback

            traceback.print_exc()
            rows.append({"mode": "error", "ctx": 0, "batch": 0, "skipped": repr(e)[:200]})
        (out / "offload.json").write_text(json.dumps({**stamp, "rows": rows, "pinned": pinned}, indent=1))
        (out / "offload.md").write_text(f"{stamp['device']}, {stamp['date']}\n\n" + table(rows, pinned))
    print(table(rows, pinned))


if __name__ == "__main__":
    main()
