"""Tensor-parallel decode on GPUs: `python bench/tp.py [--model llama-3.1-8b|llama-70b-shape]
[--sizes 1 2 4] [--contexts 32768 131072] [--batches 1 16] [--attention dense sparse] [--out DIR]`.

Per (ranks, attention, batch, context): ms per decode step on rank 0 through the runner's tensor-parallel
path (the step message to the other ranks, both all-reduces per layer, CUDA graphs where the backend
replays them, the LM head), with dummy weights; the per-rank weight-read roofline (the rank's weight
bytes / --bandwidth) and the ratio to it. `--allreduce` instead times the collectives alone: the two
[batch, hidden] all-reduces per layer of one decode step, over NCCL between `--sizes` processes.
`--message` (CPU too) times the step message alone: rank 0's `TensorParallel.send` of one decode step
(pickle + two gloo broadcasts) to one other local process, and that process's receive + unpickle; the
first message carries whole page tables, the steady state only their changes (none here).
A combination that does not fit (the KV pool holds too few pages, or the weights exceed one GPU) is
skipped with a note. Keep NCCL_NVLS_ENABLE=0 (NVLink multicast off) on shared machines.

The 70B shape is Llama-3.1-70B's (80 layers, hidden 8192, 64 / 8 heads, MLP 28672, vocabulary 128256),
written under --out as a dummy config. Prints a markdown table and writes tp.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: the Llama-3.1-8B config and the weight-bytes count)

LLAMA_70B = {**gpu.LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8}
H200_BANDWIDTH = 4.8e12  # bytes/s of HBM3e, the roofline's denominator


def model_path(name: str, out: Path) -> str:
    if name == "llama-3.1-8b":
        return gpu.model_config_path(out)
    path = out / "llama-70b-shape.json"
    path.write_text(json.dumps(LLAMA_70B))
    return str(path)


def decode_step(batch: int, ctx: int, page_size: int):
    """One decode step of `batch` sequences at context ctx, as rank 0 sends it (random page tables)."""
    from needle.engine.distributed import Step

    pages = -(-(ctx + 1) // page_size)
    tables = (torch.randperm(batch * pages).view(batch, pages) + 1).tolist()
    return Step(torch.randint(0, 1000, (batch,)).tolist(), dict(
        seq_ids=list(range(batch)), query_lens=[1] * batch, context_lens=[ctx + 1] * batch,
        page_tables=tables, modes=["sparse"] * batch, token_budgets=[gpu.BUDGET] * batch,
        num_draft_tokens=[]))


def step_ms(engine, batch: int, ctx: int, steps: int = 24) -> float:
    runner = engine.runner
    step = decode_step(batch, ctx, engine.pool.spec.page_size)
    with torch.inference_mode():
        for i in range(steps + 6):  # capture + warm-up first, through a reselect and a reuse step
            if i == 6:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            hidden, _ = runner.run(step)
            runner.model.logits(hidden)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def decode_rows(args: argparse.Namespace, out: Path) -> list[dict]:
    from needle.engine.config import EngineArgs
    from needle.engine.llm_engine import LLMEngine

    rows = []
    for size in args.sizes:
        for attention in args.attention:
            try:
                engine = LLMEngine(EngineArgs(
                    model=model_path(args.model, out), load_format="dummy", attention=attention,
                    tensor_parallel_size=size, max_model_len=max(args.contexts) + 1024,
                    enable_prefix_caching=False, streaming_ratio=0.5, sparse_recall_sample=0.0))
            except (ValueError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
                rows.append({"ranks": size, "attention": attention,
                             "skipped": f"{type(err).__name__}: {err}"})
                continue
            roofline = gpu.weight_bytes(engine) / args.bandwidth * 1e3
            for batch in args.batches:
                for ctx in args.contexts:
                    row = {"ranks": size, "attention": attention, "batch": batch, "context": ctx}
                    if batch * -(-(ctx + 1) // engine.pool.spec.page_size) >= engine.pool.num_pages:
                        rows.append({**row, "skipped": f"KV pool holds {engine.pool.capacity_tokens} tokens"})
                        continue
                    ms = step_ms(engine, batch, ctx)
                    rows.append({**row, "ms_per_step": round(ms, 3), "weight_roofline_ms": round(roofline, 3),
                                 "x_roofline": round(ms / roofline, 2)})
                    print(rows[-1], flush=True)
            engine.close()
            del engine
            torch.cuda.empty_cache()
    return rows


def _allreduce_rank(rank: int, size: int, port: int, hidden: int, layers: int, batches: list[int],
                    queue) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    times = {}
    for batch in batches:
        x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2 * layers):  # one decode step's: after o_proj and after down_proj, every layer
            dist.all_reduce(x)
        torch.cuda.synchronize()
        times[batch] = (time.perf_counter() - t0) * 1e3
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def allreduce_rows(args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    from needle.engine.distributed import free_port

    cfg = gpu.LLAMA_8B if args.model == "llama-3.1-8b" else LLAMA_70B
    rows = []
    for size in [s for s in args.sizes if s > 1]:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_allreduce_rank, nprocs=size, start_method="spawn", join=True, args=(
            size, free_port(), cfg["hidden_size"], cfg["num_hidden_layers"], args.batches, queue))
        for batch, ms in queue.get().items():
            rows.append({"ranks": size, "batch": batch, "allreduce_ms_per_step": round(ms, 3)})
            print(rows[-1], flush=True)
    return rows


def _message_rank(rank: int, port: int, batch: int, ctx: int, reps: int, queue) -> None:
    from needle.engine.distributed import RankAddress, Step, TensorParallel

    ranks = TensorParallel(RankAddress(rank, 2, port), torch.device("cpu"))
    step = decode_step(batch, ctx, 16)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        if rank == 0:
            ranks.send(step)
        else:
            ranks.receive()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        ranks.send(Step(None))
    else:
        ranks.receive()
    queue.put((rank, times[0] * 1e3, sorted(times[1:])[len(times) // 2 - 1] * 1e3))
    torch.distributed.destroy_process_group()


def message_rows(args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    from needle.engine.distributed import free_port

    rows = []
    for batch in args.batches:
        for ctx in args.contexts:
            queue = mp.get_context("spawn").SimpleQueue()
            mp.start_processes(_message_rank, nprocs=2, start_method="spawn", join=True,
                               args=(free_port(), batch, ctx, 50, queue))
            ms = {rank: (first, steady) for rank, first, steady in (queue.get() for _ in range(2))}
            rows.append({"batch": batch, "context": ctx, "first_send_ms": round(ms[0][0], 3),
                         "first_receive_ms": round(ms[1][0], 3), "send_ms": round(ms[0][1], 3),
                         "receive_ms": round(ms[1][1], 3)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b", choices=["llama-3.1-8b", "llama-70b-shape"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--attention", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    p.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="HBM bytes/s for the roofline")
    p.add_argument("--allreduce", action="store_true", help="time the per-step all-reduces alone")
    p.add_argument("--message", action="store_true", help="time the per-step message alone (CPU too)")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args()
    if not args.message and not torch.cuda.is_available():
        raise SystemExit("bench/tp.py needs CUDA GPUs (except --message)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "message" if args.message else "allreduce" if args.allreduce else "decode"
    rows = {"message": message_rows, "allreduce": allreduce_rows}[mode](args) if mode != "decode" \
        else decode_rows(args, args.out)
    (args.out / f"tp-{mode}-{args.model}.json").write_text(json.dumps(rows, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
