"""Speculative decoding on the CPU, side by side in one run: decode tokens/s with and without speculation,
acceptance, and whether the output equals the reference (dense, no speculation).

    python bench/spec_decode.py copy              # batch 1, the answer copies the prompt: ngram vs none
    python bench/spec_decode.py long --batch 2    # self_sparse (dense verify) vs dense vs sparse

Decode throughput counts only steps after every sequence has its first token (prefill excluded).
"""

from __future__ import annotations

import argparse
import time

from needle import LLM, SamplingParams

CODE = "\n".join(f"def f{i}(x):\n    y = x * {i} + {i % 7}\n    return y - {i % 3}\n" for i in range(40))


def copy_prompts(n: int) -> list[str]:
    changed = CODE.replace("def f7(x)", "def f7(x, z=1)")
    return [f"{CODE}\n# The same file with f7 taking z=1; write it out in full:\n{changed[:200]}"] * n


def long_prompts(n: int, context: int, tokenizer) -> list[list[int]]:
    text = " ".join(f"Record {i}: the {['red', 'blue', 'green', 'grey'][i % 4]} crate in row {i % 17} "
                    f"holds {i * 13 % 101} tins." for i in range(context // 8))
    ids = tokenizer.encode(text)
    return [ids[i * 7: i * 7 + context - 16] + tokenizer.encode(f" Question {i}: what does record 5 hold?")
            for i in range(n)]


def run(llm: LLM, prompts, new_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {}
    decode_time = decode_tokens = drafted = accepted = 0
    while engine.has_unfinished():
        warm = len(tokens) == len(prompts)
        start = time.perf_counter()
        outputs, stats = engine.step()
        if warm:
            decode_time += time.perf_counter() - start
            decode_tokens += stats.num_generation_tokens
        if stats.spec is not None:
            drafted += stats.spec.num_draft_tokens
            accepted += stats.spec.num_accepted_tokens
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return {"tok_s": decode_tokens / max(decode_time, 1e-9), "tokens": tokens,
            "acceptance": accepted / drafted if drafted else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["copy", "long"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-budget", type=int, default=512)
    args = ap.parse_args()
    common = dict(kv_cache_memory="2GiB", max_num_batched_tokens=8192)
    if args.scenario == "copy":
        runs = [("no speculation", dict(attention="dense")),
                ("ngram, fixed K", dict(attention="dense", speculative_config={
                    "method": "ngram", "num_speculative_tokens": args.k, "dynamic": False})),
                ("ngram, goodput", dict(attention="dense", speculative_config={
                    "method": "ngram", "num_speculative_tokens": args.k}))]
    else:
        spec = {"method": "self_sparse", "num_speculative_tokens": args.k, "dynamic": False,
                "draft_token_budget": args.draft_budget}
        runs = [("dense", dict(attention="dense")), ("sparse", dict(attention="sparse")),
                ("self_sparse + dense verify, fixed K", dict(attention="dense", speculative_config=spec)),
                ("self_sparse + dense verify, goodput", dict(attention="dense",
                                                             speculative_config={**spec, "dynamic": True}))]
    reference = None
    print("| configuration | decode tok/s | speed-up | acceptance | output = reference |")
    print("|---|---|---|---|---|")
    base = None
    for name, kw in runs:
        llm = LLM(**common, **kw)
        prompts = (copy_prompts(args.batch) if args.scenario == "copy"
                   else long_prompts(args.batch, args.context, llm.tokenizer))
        result = run(llm, prompts, args.new_tokens)
        reference = reference or result["tokens"]
        base = base or result["tok_s"]
        same = "yes" if result["tokens"] == reference else "no"
        print(f"| {name} | {result['tok_s']:.2f} | {result['tok_s'] / base:.2f}x | "
              f"{result['acceptance']:.2f} | {same} |", flush=True)
        del llm


if __name__ == "__main__":
    main()
