"""Decode tokens/s at long context on the CPU: the in-place kernel (attention/cpu_decode.py) against the
torch path that copies each sequence's context out of the pages first, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.cpu_decode [--context 7000] [--batches 1 8]
        [--decode-tokens 16] [--kv-cache-dtypes auto float16] [--attention dense] [--shared-prefix]
        [--layer-only]

Per KV dtype one engine prefills the prompts once (prefix caching keeps them); every timed run then
re-prefills only the uncached tail, so decode tokens/s = batch * N / (t(1 + N tokens) - t(1 token)).
Prompts are distinct stdlib text; with --shared-prefix the batch's prompts share all but their last
tokens (one prefill instead of one per sequence, but the sequences then read the same pages, which
caches flatter at batch > 1). --layer-only times one layer's decode attention alone instead, over random
pages scattered through the pool (the bundled model's 3 KV heads of 64, 9 query heads): no model, no
prefill. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.texts import long_prompt
from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.engine import LLM, SamplingParams
from needle.engine.config import EngineArgs
from needle.kvcache.pool import KVCacheSpec, KVPool

TAIL = 24  # tokens that make each shared-prefix prompt its own


def prompts_for(tokenizer, batch: int, context: int, shared: bool) -> list[list[int]]:
    if not shared:
        return [long_prompt(tokenizer, context, offset=i * 7 * context) for i in range(batch)]
    base = long_prompt(tokenizer, context - TAIL)
    return [base + (tokenizer.encode(f"\n# Question {i}: what does this code do? " * 4))[:TAIL]
            for i in range(batch)]


def elapsed(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def decode_rate(llm: LLM, prompts: list[list[int]], tokens: int, repeats: int) -> float:
    """Aggregate decode tokens/s, the tail prefill and the first token subtracted out."""
    first = min(elapsed(llm, prompts, 1) for _ in range(repeats))
    total = min(elapsed(llm, prompts, 1 + tokens) for _ in range(repeats))
    return len(prompts) * tokens / (total - first)


def layer_ms(dtype: str, batch: int, context: int, repeats: int) -> dict[bool, float]:
    """ms of one layer's decode attention, copy-then-SDPA (False) and in place (True), best of repeats."""
    spec = KVCacheSpec(1, 3, 64, 16, kv_dtype=EngineArgs(kv_cache_dtype=dtype).kv_page_dtype)
    per_seq = -(-context // spec.page_size)
    pool = KVPool(spec, per_seq * batch, torch.device("cpu"), False)
    pool.k.copy_(torch.randn(pool.k.shape))
    pool.v.copy_(torch.randn(pool.v.shape))
    pages = torch.randperm(per_seq * batch).view(batch, per_seq).tolist()
    meta = AttentionMetadata.build(list(range(batch)), [1] * batch, [context] * batch, pages, 16, "cpu")
    backend, q = DenseBackend(pool), torch.randn(batch, 9, 64)
    times = {}
    for in_place in (False, True):
        backend.in_place = in_place
        backend.attend(0, q, meta)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.attend(0, q, meta)
            runs.append(time.perf_counter() - start)
        times[in_place] = 1e3 * min(runs)
    return times


def print_table(unit: str, rows: list[tuple[str, int, float, float]], faster_when_lower: bool) -> None:
    print(f"| KV pages | batch | copy then SDPA ({unit}) | in place ({unit}) | speed-up |")
    print("|---|---|---|---|---|")
    for dtype, batch, old, new in rows:
        gain = old / new if faster_when_lower else new / old
        print(f"| {'fp32' if dtype == 'auto' else dtype} | {batch} | {old:.2f} | {new:.2f} | {gain:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "float16"])
    ap.add_argument("--attention", choices=["dense", "sparse"], default="dense")
    ap.add_argument("--shared-prefix", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layer-only", action="store_true")
    args = ap.parse_args()
    rows = []
    if args.layer_only:
        for dtype in args.kv_cache_dtypes:
            for batch in args.batches:
                ms = layer_ms(dtype, batch, args.context, max(args.repeats, 10))
                rows.append((dtype, batch, ms[False], ms[True]))
        print(f"one layer's decode attention at context {args.context}, {torch.get_num_threads()} threads")
        print_table("ms", rows, faster_when_lower=True)
        return
    with torch.inference_mode():
        for dtype in args.kv_cache_dtypes:
            sequences = max(args.batches) * (args.context + args.decode_tokens + 64)
            llm = LLM(attention=args.attention, kv_cache_dtype=dtype, kv_cache_memory=f"{sequences * 47}KiB",
                      enable_prefix_caching=True, max_num_batched_tokens=8192, max_num_seqs=max(args.batches))
            backend = llm.engine.backend
            dense = backend if isinstance(backend, DenseBackend) else backend.dense
            if not dense.in_place:
                raise SystemExit("the in-place kernel is not available here (see attention/cpu_decode.py)")
            for batch in args.batches:
                prompts = prompts_for(llm.tokenizer, batch, args.context, args.shared_prefix)
                elapsed(llm, prompts, 1)  # prefill once: later runs hit the prefix cache
                rates = {}
                for in_place in (False, True):
                    dense.in_place = in_place
                    rates[in_place] = decode_rate(llm, prompts, args.decode_tokens, args.repeats)
                rows.append((dtype, batch, rates[False], rates[True]))
                print(rows[-1], flush=True)
            del llm
    prompts = "shared-prefix" if args.shared_prefix else "distinct"
    print(f"\ncontext {args.context}, {args.attention} attention, {torch.get_num_threads()} threads, "
          f"{args.decode_tokens} decode tokens, {prompts} prompts")
    print_table("tok/s", rows, faster_when_lower=False)


if __name__ == "__main__":
    main()
