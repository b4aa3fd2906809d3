"""Speculative decoding on the H200: what a verify step costs, and what self_sparse would gain there.

    python bench/spec_gpu.py --out DIR [--acceptance 0.86 0.98]

Llama-3.1-8B shapes with dummy weights (`--load-format dummy`), so acceptance means nothing here; the
prediction uses the acceptance measured on the CPU with the real model (BENCHMARKS.md). For dense and
sparse attention, at 8K/32K/128K x batch 1/8/16 (what fits the pool):
  * ms of a verify step with k+1 in {1, 2, 4, 8} queries per sequence (k+1 = 1 is a plain decode step),
    through the engine's runner (CUDA graphs, the LM head on every row), and its ratio to decode;
  * ms of one self_sparse draft round (the same model, sparse at the draft budget, graphed);
  * the goodput controller's step-time model fitted on these shapes (a step = k draft rounds + the
    verify), and its relative error on each;
  * the predicted self_sparse speed-up over plain decode: E[tokens](a, k) / step(k) x decode.
Writes spec_gpu.json, spec_gpu.md and (with matplotlib) spec_gpu.png under --out; `--replot JSON`
redraws the plot from a saved run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from gpu import fill_pool, make_engine, model_config_path

CONTEXTS = (8192, 32768, 131072)
BATCHES = (1, 8, 16)
QUERIES = (1, 2, 4, 8)
BUDGET, DRAFT_BUDGET = 2048, 512


def spec_config(draft_budget: int) -> str:
    return json.dumps({"method": "self_sparse", "num_speculative_tokens": max(QUERIES) - 1, "dynamic": False,
                       "draft_token_budget": draft_budget})


def tables(batch: int, ctx: int, page_size: int) -> list[list[int]]:
    pages = (ctx + max(QUERIES) + page_size - 1) // page_size
    return (torch.randperm(batch * pages).view(batch, pages) + 1).tolist()


def step_ms(runner, meta, steps: int = 20) -> float:
    """ms per step of runner.forward + logits on every row (graph when it applies)."""
    ids = torch.randint(0, 1000, (meta.slot_mapping.numel(),), device=runner.device)
    with torch.inference_mode():
        for _ in range(6):  # capture + warm-up, through a reselect and a reuse step
            runner.model.logits(runner.forward(ids, meta))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.model.logits(runner.forward(ids, meta))
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def measure(mode: str, out: Path, result: dict) -> None:
    from needle.attention.base import AttentionMetadata

    engine = make_engine(model_config_path(out), mode, 80, speculative_config=spec_config(DRAFT_BUDGET))
    fill_pool(engine.pool)
    cap, ps = engine.pool.capacity_tokens, engine.pool.spec.page_size
    drafter = engine.spec.drafter.runner
    for ctx in CONTEXTS:
        for batch in BATCHES:
            if batch * (ctx + 16) > cap - 64:
                result["skipped"].append(f"{mode} {batch}x{ctx}: exceeds the {cap}-token pool")
                continue
            tb, ids = tables(batch, ctx, ps), list(range(batch))
            draft = AttentionMetadata.build(ids, [1] * batch, [ctx + 1] * batch, tb, ps, engine.device,
                                            ["sparse"] * batch, [DRAFT_BUDGET] * batch)
            draft_ms = step_ms(drafter, draft)
            for n in QUERIES:
                meta = AttentionMetadata.build(ids, [n] * batch, [ctx + n] * batch, tb, ps, engine.device,
                                               [mode] * batch, [BUDGET] * batch, [n - 1] * batch)
                row = {"mode": mode, "ctx": ctx, "batch": batch, "queries": n,
                       "ms": step_ms(engine.runner, meta), "draft_round_ms": draft_ms}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            (out / "spec_gpu.json").write_text(json.dumps(result, indent=1))
    del engine, drafter
    gc.collect()
    torch.cuda.empty_cache()


def fit(result: dict) -> None:
    """The controller's model per mode, over every shape: step(k) = k draft rounds + verify(k + 1)."""
    from needle.engine.spec_decode.controller import GoodputController

    for mode in ("dense", "sparse"):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        ctl = GoodputController(max(QUERIES) - 1)
        shapes = []
        for r in rows:
            k = r["queries"] - 1
            r["step_ms"] = r["ms"] + k * r["draft_round_ms"]
            shapes.append(ctl.shape_for(k, [r["ctx"]] * r["batch"], r["batch"] if k else 0))
            ctl.observe(shapes[-1], r["step_ms"] / 1e3)
        ctl.fit()
        for r, shape in zip(rows, shapes, strict=True):
            r["predicted_ms"] = ctl.predict(shape) * 1e3
            r["fit_error"] = abs(r["predicted_ms"] - r["step_ms"]) / r["step_ms"]
        errs = [r["fit_error"] for r in rows]
        result["fit"][mode] = {"mean_error": sum(errs) / len(errs), "max_error": max(errs)}


def report(result: dict, acceptance: list[float]) -> str:
    from needle.engine.spec_decode.controller import expected_tokens

    rows = result["rows"]
    by = {(r["mode"], r["ctx"], r["batch"], r["queries"]): r for r in rows}
    lines = [f"{result['device']}, {result['date']}; Llama-3.1-8B shapes, dummy weights, bf16, sparse budget "
             f"{BUDGET}, draft budget {DRAFT_BUDGET}, CUDA graphs.", "",
             "| attention | context | batch | decode ms | verify 2 | verify 4 | verify 8 | draft round ms |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("dense", "sparse"):
        for ctx in CONTEXTS:
            for batch in BATCHES:
                base = by.get((mode, ctx, batch, 1))
                if base is None:
                    continue
                ms = [by[(mode, ctx, batch, n)]["ms"] for n in QUERIES[1:]]
                cells = [f"{m:.2f} ({m / base['ms']:.2f}x)" for m in ms]
                lines.append(f"| {mode} | {ctx // 1024}K | {batch} | {base['ms']:.2f} | " + " | ".join(cells)
                             + f" | {base['draft_round_ms']:.2f} |")
    lines += ["", "Step-time model (the controller's features, non-negative fit over these shapes): "
              + "; ".join(f"{m}: mean error {100 * f['mean_error']:.1f}%, max {100 * f['max_error']:.1f}%"
                          for m, f in result["fit"].items()), ""]
    for mode in ("dense", "sparse"):
        base = by.get((mode, 32768, 16, 1))
        if base is None:
            continue
        for a in acceptance:
            best = max(((n - 1, expected_tokens(a, n - 1) / by[(mode, 32768, 16, n)]["step_ms"] * base["ms"])
                        for n in QUERIES), key=lambda kv: kv[1])
            lines.append(f"- self_sparse drafts, {mode} verify, 32K batch 16, acceptance {a}: predicted "
                         f"{best[1]:.2f}x plain {mode} decode at k = {best[0]}")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Verify cost vs queries per sequence (one line per context x batch), and the predicted speed-up
    of self_sparse + dense verify at 32K x 16 against acceptance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from needle.engine.spec_decode.controller import expected_tokens

    by = {(r["mode"], r["ctx"], r["batch"], r["queries"]): r for r in result["rows"]}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, mode in zip(axes[:2], ("dense", "sparse"), strict=True):
        for ctx in CONTEXTS:
            for batch in BATCHES:
                if (mode, ctx, batch, 1) not in by:
                    continue
                base = by[(mode, ctx, batch, 1)]["ms"]
                ax.plot(QUERIES, [by[(mode, ctx, batch, n)]["ms"] / base for n in QUERIES], marker="o",
                        label=f"{ctx // 1024}K x {batch}")
        ax.axhline(1.2, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{mode} verify cost", xlabel="queries per sequence (k + 1)",
               ylabel="step time / decode step", xticks=QUERIES)
        ax.legend(fontsize=7)
    ax = axes[2]
    base = by.get(("dense", 32768, 16, 1))
    if base is not None:
        accept = [0.5 + 0.01 * i for i in range(50)]
        for k in (1, 3, 7):
            step = by[("dense", 32768, 16, k + 1)]["ms"] + k * by[("dense", 32768, 16, 1)]["draft_round_ms"]
            ax.plot(accept, [expected_tokens(a, k) * base["ms"] / step for a in accept], label=f"k = {k}")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set(title="self_sparse + dense verify, 32K x 16 (predicted)", xlabel="per-draft acceptance",
               ylabel="speed-up over dense decode")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, Llama-3.1-8B shapes, {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the JSON and table go")
    ap.add_argument("--acceptance", type=float, nargs="+", default=[0.86, 0.98],
                    help="per-draft acceptance for the prediction (measured on the CPU, BENCHMARKS.md)")
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    ap.add_argument("--replot", default=None, help="a saved spec_gpu.json: only redraw its plot")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), out / "spec_gpu.png")
        return
    if not torch.cuda.is_available():
        sys.exit("bench/spec_gpu.py needs a CUDA device")
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"device": torch.cuda.get_device_name(), "date": date, "rows": [], "skipped": [], "fit": {}}
    for mode in args.modes:
        measure(mode, out, result)
    fit(result)
    table = report(result, args.acceptance)
    (out / "spec_gpu.json").write_text(json.dumps(result, indent=1))
    (out / "spec_gpu.md").write_text(table + "\n")
    print(table)
    try:
        plot(result, out / "spec_gpu.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
