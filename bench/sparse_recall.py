"""GQA selection, measured: attention recall of page selection per query head vs shared per KV group.

    python -m bench.sparse_recall --length 2048 --budgets 256 512 --steps 16

Every head is made a retrieval head and every decode step also computes dense attention, so the recall
(share of the dense attention mass held by the keys read, averaged over sparse layers and heads) is
measured on the same prompt and the same prefilled cache for both choices. Per-query-head selection
reads `group` times more distinct pages for the same budget; it is worth it only if recall rises.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics

from needle.attention.head_profile import HeadProfile
from needle.attention.sparse import SparseBackend
from needle.engine.calibrate import passkey_prompt
from needle.engine.llm import LLM
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams


def recall(llm: LLM, backend: SparseBackend, prompt: list[int], budget: int, steps: int) -> float:
    engine = llm.engine
    engine.set_backend(backend)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True,
                            attention=AttentionOverride(mode="sparse", token_budget=budget))
    engine.add_request(f"r{budget}{backend.per_query_head}", prompt, params)
    samples: list[float] = []
    while engine.has_unfinished():
        _, stats = engine.step()
        samples += stats.attention.recall_samples
    return statistics.mean(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--policy", default="hierarchical")
    args = parser.parse_args(argv)
    llm = LLM(attention="sparse", sparse_policy=args.policy, sparse_recall_sample=1.0, streaming_ratio=0.0)
    engine, cfg = llm.engine, llm.engine.model_config
    prompt, _, _ = passkey_prompt(llm.tokenizer, args.length, 0.5, random.Random(0))
    profile = HeadProfile.all_retrieval(cfg.name, cfg.num_layers, cfg.num_kv_heads)
    print(f"| budget | shared per KV group | per query head |  ({args.policy}, {args.length} tokens)")
    print("|---|---|---|")
    for budget in args.budgets:
        configs = [dataclasses.replace(engine.sparse_config, per_query_head=per_q) for per_q in (False, True)]
        row = [recall(llm, SparseBackend(engine.pool, config, profile, cfg.num_heads, cfg.num_kv_heads),
                      prompt, budget, args.steps)
               for config in configs]
        print(f"| {budget} | {row[0]:.4f} | {row[1]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
