"""needle vs transformers on this machine, side by side in one run (issue 2's benchmark).

    .venv/bin/python -m bench.engine_vs_transformers [--prefill-tokens 7000] [--decode-tokens 64]

Measures, for the bundled SmolLM2-135M on the CPU: time to prefill a long prompt (to the first
token), single-stream decode tokens/s, and aggregate decode tokens/s of 8 concurrent sequences
(needle batches them; transformers' reference is its single-stream rate). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from bench.texts import long_prompt
from needle.engine import LLM, SamplingParams
from needle.engine.loader import bundled_gguf, gguf_to_directory


def hf_time(model, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def needle_time(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-tokens", type=int, default=7000)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    directory = gguf_to_directory(bundled_gguf())
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    llm = LLM(attention="dense", kv_cache_memory="2GiB", enable_prefix_caching=False,
              max_num_batched_tokens=8192)
    tok = llm.tokenizer
    long_ids = long_prompt(tok, args.prefill_tokens)
    short = [tok.encode(f"Question {i}: tell me something about the number {i}.") for i in
             range(args.concurrency)]
    n = args.decode_tokens
    with torch.inference_mode():
        hf_time(hf, short[0], 2)  # warm-up
        needle_time(llm, [short[0]], 2)
        rows = []
        hf_prefill = best_of(args.repeats, lambda: hf_time(hf, long_ids, 1))
        nd_prefill = best_of(args.repeats, lambda: needle_time(llm, [long_ids], 1))
        rows.append((f"prefill {len(long_ids)} tokens (s, to first token)", hf_prefill, nd_prefill,
                     hf_prefill / nd_prefill))
        hf_single = n / (best_of(args.repeats, lambda: hf_time(hf, short[0], n))
                         - best_of(args.repeats, lambda: hf_time(hf, short[0], 1)))
        nd_single = n / (best_of(args.repeats, lambda: needle_time(llm, [short[0]], n))
                         - best_of(args.repeats, lambda: needle_time(llm, [short[0]], 1)))
        rows.append(("single-stream decode (tok/s)", hf_single, nd_single, nd_single / hf_single))
        nd_batch = args.concurrency * n / (best_of(args.repeats, lambda: needle_time(llm, short, n))
                                           - best_of(args.repeats, lambda: needle_time(llm, short, 1)))
        rows.append((f"{args.concurrency} concurrent, aggregate decode (tok/s)", hf_single, nd_batch,
                     nd_batch / hf_single))
    import transformers

    print(f"| measure | transformers {transformers.__version__} | needle | speed-up |")
    print("|---|---|---|---|")
    for name, h, ours, ratio in rows:
        print(f"| {name} | {h:.2f} | {ours:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
