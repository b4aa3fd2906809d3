"""Decode throughput at long context, sparse vs dense attention, side by side in one process.

    python -m bench.sparse_decode --context 8192 --seqs 8 --steps 8

Both backends run the same model over the same KV pool. The pool is filled with random keys and values
(and exact summaries) instead of prefilling 8 x 8K prompts: decode cost does not depend on the values,
and a CPU prefill of that size would dominate the run. Each step decodes one token for every sequence
through the whole model (embedding to logits), as the runner does.
"""

from __future__ import annotations

import argparse
import time

import torch

from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.engine.llm import LLM
from needle.engine.loader import load_config, resolve_model
from needle.kvcache.pool import KVCacheSpec
from needle.kvcache.summaries import update_summaries


def fill_pool(pool, num_tokens: int) -> None:
    """Random K/V in the first pages of every layer, with their key summaries."""
    page = pool.spec.page_size
    gen = torch.Generator().manual_seed(0)
    pages = -(-num_tokens // page)
    slots = torch.arange(pages * page)
    for layer in range(pool.spec.num_layers):
        pool.k[layer, :pages].copy_(torch.randn(pool.k[layer, :pages].shape, generator=gen))
        pool.v[layer, :pages].copy_(torch.randn(pool.v[layer, :pages].shape, generator=gen))
        update_summaries(pool, layer, slots)


def decode_meta(seqs: int, ctx: int, pages_per_seq: int, page: int, mode: str) -> AttentionMetadata:
    tables = [list(range(s * pages_per_seq, (s + 1) * pages_per_seq)) for s in range(seqs)]
    return AttentionMetadata.build(list(range(seqs)), [1] * seqs, [ctx] * seqs, tables, page, "cpu",
                                   [mode] * seqs)


def tokens_per_second(llm: LLM, backends: dict[str, object], args) -> dict[str, float]:
    """Steps of the backends alternate, so a busy shared CPU slows both alike."""
    engine = llm.engine
    page = engine.pool.spec.page_size
    pages_per_seq = -(-(args.context + args.steps + 1) // page)
    ids = torch.randint(0, engine.model_config.vocab_size, (args.seqs,))
    elapsed = dict.fromkeys(backends, 0.0)
    with torch.inference_mode():
        for step in range(args.steps + 1):  # step 0 warms up (and makes the first selection)
            for mode, backend in backends.items():
                meta = decode_meta(args.seqs, args.context + step, pages_per_seq, page, mode)
                t0 = time.perf_counter()
                backend.begin_step(meta)
                engine.model.logits(engine.model(ids, backend, meta))
                if step:
                    elapsed[mode] += time.perf_counter() - t0
    return {mode: args.seqs * args.steps / t for mode, t in elapsed.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--policy", default="hierarchical")
    parser.add_argument("--budget", type=int, default=None, help="sparse token budget (default: engine's)")
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    parser.add_argument("--quantization", default="none", help="weights: none (fp32) or int4 (CPU)")
    args = parser.parse_args(argv)
    pages = args.seqs * -(-(args.context + args.steps + 1) // 16)
    path, name = resolve_model(args.model, "auto")
    cfg = load_config(path, name)
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16)
    llm = LLM(args.model, attention="sparse", sparse_policy=args.policy, sparse_token_budget=args.budget,
              sparse_recall_sample=0.0, quantization=args.quantization,
              kv_cache_memory=str(int(pages * 1.05 * spec.bytes_per_page(True))))
    fill_pool(llm.engine.pool, pages * 16)
    sparse = llm.engine.backend
    tps = tokens_per_second(llm, {"dense": DenseBackend(llm.engine.pool), "sparse": sparse}, args)
    rows = [("dense", tps["dense"]), (f"sparse ({args.policy}, budget {sparse.token_budget})", tps["sparse"])]
    print(f"{name} ({args.quantization} weights): decode, {args.seqs} sequences x {args.context} tokens "
          f"context, {torch.get_num_threads()} threads")
    print("| attention | tokens/s | speed-up |\n|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.2f} | {tps / rows[0][1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
