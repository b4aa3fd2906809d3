"""Quality harness: retrieval accuracy and long-document perplexity, dense vs sparse configurations.

    python -m bench.quality --lengths 8192 --budgets 1024 --samples 50 --out quality.json

Retrieval tasks (bench/quality_tasks.py: passkey, needle, multikey, and RULER-style niah_number,
niah_word, niah_uuid, qa, vt) hide keyed facts at spread depths of each haystack and ask for every key,
so the questions of one haystack share its prefilled prefix (prefix caching): a sample costs a short
question prefill plus a few decode steps. Every cell keeps each answer's right/wrong and depth, so the
report gives accuracy per depth bucket, and the harness resumes a haystack at a time: a row that has a
haystack's answers never runs it again (adding a budget does not re-run dense).
Perplexity: the last `--ppl-tokens` tokens of a long standard-library document, teacher-forced one
decode step at a time after a prefill of the rest, so the sparse decode path (selection) is measured.

Rows: dense; each sparse policy with the shipped head profile at each budget; and `streaming`, the
StreamingLLM baseline (every head of a sparse layer reads sinks + the newest tokens, same budget). All
run on one sparse engine: dense rows by per-request override, policies switched in place, budgets per
request; sparse rows share one sparse prefill of each haystack (its KV does not depend on the policy,
nor on budgets within the streaming heads' prefill window), so they differ only in decode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from bench.quality_tasks import TASKS, Question, haystack, is_right, max_answer_tokens, pieces
from bench.texts import stdlib_modules
from needle.attention.base import AttentionMetadata
from needle.engine.llm import LLM, merge
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams

PPL_MODULES = ("collections/__init__", "functools", "subprocess", "tarfile", "logging/__init__")
DEPTH_BUCKETS = 5
ROW_OPTIONS = ("obs", "min_recall", "interval", "heads", "top_p", "top_p_floor", "drift")
_request_ids = itertools.count()


def page_aligned(prefix: list[int], question: list[int], newline: list[int], page: int) -> list[int]:
    """prefix + newlines + question, padded so that every token but the last fills whole KV pages: once
    one row has run a question, the prefix cache holds all of it, and the other rows (policies and
    budgets prefill alike) only recompute the last token (or the observation window) before decoding."""
    pad = (1 - len(prefix) - len(question)) % page
    return prefix + newline * pad + question


def answers_right(llm: LLM, prompts: list[list[int]], overrides: list[AttentionOverride],
                  expected: list[str], distinct: int, max_tokens: int, telemetry: Counter) -> list[bool]:
    """Greedy answers. The first prompt runs alone, then the rest of the first `distinct`, so that the
    shared prefix and then every question are in the prefix cache before their repeats run."""
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, attention=o) for o in overrides]
    texts = [text for lo, hi in ((0, 1), (1, distinct), (distinct, len(prompts)))
             for text in generate(llm, prompts[lo:hi], params[lo:hi], telemetry)]
    return [is_right(text, answer) for text, answer in zip(texts, expected, strict=True)]


def generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
             telemetry: Counter) -> list[str]:
    """LLM.generate's loop, also summing each step's attention telemetry into `telemetry`: keys read
    (per layer and query head) and sparse decode steps, for the mean keys a step reads, and the
    reselections that query drift caused."""
    engine, results = llm.engine, {}
    order = [f"q{next(_request_ids)}" for _ in prompts]
    for rid, prompt, p in zip(order, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished():
        outputs, stats = engine.step()
        for out in outputs:
            merge(results, out)
        telemetry.update(keys_read=sum(stats.attention.tokens_read), steps=len(stats.attention.tokens_read),
                         drift=stats.attention.drift_reselections)
    return [results[rid].outputs[0].text for rid in order]


def rows(args) -> list[tuple[str, int | None]]:
    """(row, budget): dense first, then every policy (the streaming baseline included) at every budget."""
    return [("dense", None)] + [(p, b) for p in args.policies for b in args.budgets]


def groups_done(cell: dict | float | None, needles: int) -> float:
    """Haystacks a results cell holds (a bare number: a finished cell of an older results file)."""
    if cell is None:
        return 0
    return math.inf if isinstance(cell, float | int) else len(cell["right"]) // needles


def retrieval(llm: LLM, args, name: str, length: int, results: dict, save: Callable[[], None]) -> None:
    """Fill the cells of one task and length, a haystack at a time, running only the rows that lack
    that haystack (so a new budget or policy never re-runs the others); saves after each haystack."""
    task = TASKS[name]
    needles = args.needles or task.needles
    newline, page = pieces(llm.tokenizer, "\n"), llm.engine.args.page_size
    for group in range(max(1, args.samples // needles)):
        todo = [(r, b) for r, b in rows(args)
                if groups_done(results.get(f"{name}/{length}/{r}/{b}"), needles) <= group]
        if not todo:
            continue
        prefix, questions = haystack(llm.tokenizer, task, length, needles, args.seed, group)
        prompts = [page_aligned(prefix, q.ids, newline, page) for q in questions]
        expected, n = [q.answer for q in questions], len(questions)
        tokens = max_answer_tokens(llm.tokenizer, questions)

        def store(row: str, budget: int | None, right: list[bool], telemetry: Counter,
                  asked: list[Question] = questions) -> None:
            cell = results.setdefault(f"{name}/{length}/{row}/{budget}", {"right": [], "depth": []})
            cell["right"] += [int(r) for r in right]
            cell["depth"] += [q.depth for q in asked]
            for key in ("keys_read", "steps", "drift"):
                cell[key] = cell.get(key, 0) + telemetry[key]

        if ("dense", None) in todo:
            store("dense", None, answers_right(llm, prompts, [AttentionOverride(mode="dense")] * n, expected,
                                               n, tokens, Counter()), Counter())
        for policy in args.policies:
            budgets = [b for r, b in todo if r == policy]
            if not budgets:
                continue
            _set_policy(llm, policy)
            overrides = [AttentionOverride(mode="sparse", token_budget=b)
                         for b in budgets for _ in range(n)]  # budget-major, like the prompts
            telemetry: Counter = Counter()
            right = answers_right(llm, prompts * len(budgets), overrides, expected * len(budgets), n, tokens,
                                  telemetry)
            for j, b in enumerate(budgets):  # budgets batched together share one telemetry: kept for none
                store(policy, b, right[j * n:(j + 1) * n], telemetry if len(budgets) == 1 else Counter())
        save()


def accuracy(cell: dict | float | None) -> float | None:
    if cell is None or isinstance(cell, float | int):
        return cell
    return 100.0 * sum(cell["right"]) / len(cell["right"]) if cell["right"] else None


def by_depth(cell: dict) -> list[float | None]:
    """Accuracy (%) per depth bucket (DEPTH_BUCKETS equal slices of the document)."""
    hits: Counter[int] = Counter()
    asked: Counter[int] = Counter()
    for right, depth in zip(cell["right"], cell["depth"], strict=True):
        bucket = min(DEPTH_BUCKETS - 1, int(depth * DEPTH_BUCKETS))
        hits[bucket] += right
        asked[bucket] += 1
    return [100.0 * hits[b] / asked[b] if asked[b] else None for b in range(DEPTH_BUCKETS)]


def perplexities(llm: LLM, args) -> dict[str, float]:
    """exp(mean NLL) of the document's last ppl_tokens, each predicted by a decode step (teacher forcing),
    for every row. Drives the model directly over pages 0.. of the pool, so it must run last on an engine
    (it overwrites pages the prefix cache may still name)."""
    ids = llm.tokenizer.encode(stdlib_modules(PPL_MODULES))[: args.ppl_length]
    split = len(ids) - args.ppl_tokens
    out = {}
    for mode in ("dense", "sparse"):
        mode_rows = [(r, b) for r, b in rows(args) if (r == "dense") == (mode == "dense")]
        _forward(llm, ids, 0, split, mode, mode_rows[0][1] or 0)  # the shared prefill
        for row, budget in mode_rows:
            if row != "dense":
                _set_policy(llm, row)
            nll = 0.0
            for pos in range(split, len(ids)):  # the forward at position pos - 1 predicts ids[pos]
                logits = _forward(llm, ids, pos - 1, 1, mode, budget or 0)
                nll -= torch.log_softmax(logits.float(), -1)[0, ids[pos]].item()
            out[f"{row}/{budget}"] = math.exp(nll / args.ppl_tokens)
            llm.engine.backend.release(0)
    return out


def _forward(llm: LLM, ids: list[int], start: int, n: int, mode: str, budget: int) -> torch.Tensor:
    """Run positions start..start+n of ids as sequence 0 over pages 0..; -> logits of the last one."""
    engine = llm.engine
    model, page = engine.model, engine.pool.spec.page_size
    table = list(range(-(-len(ids) // page)))
    chunk = engine.args.max_num_batched_tokens
    with torch.inference_mode():
        for s in range(start, start + n, chunk):
            m = min(chunk, start + n - s)
            meta = AttentionMetadata.build([0], [m], [s + m], [table], page, "cpu", [mode], [budget])
            hidden = engine.runner.forward(torch.tensor(ids[s:s + m]), meta)
        return model.logits(hidden[-1:])


def run(args) -> dict:
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=1))

    llm = LLM(attention="sparse", max_num_seqs=args.batch, sparse_recall_sample=0.0,
              kv_cache_memory=args.kv_cache, **dict(_engine_arg(kv) for kv in args.engine_arg))
    for task in args.tasks:
        for length in args.lengths:
            t0 = time.time()
            retrieval(llm, args, task, length, results, save)
            done = [(r, b, accuracy(results.get(f"{task}/{length}/{r}/{b}")) or 0) for r, b in rows(args)]
            print(f"{task}/{length} ({time.time() - t0:.0f}s): "
                  + ", ".join(f"{r}/{b} {a:.0f}" for r, b, a in done), flush=True)
    if args.ppl and any(f"ppl/{r}/{b}" not in results for r, b in rows(args)):
        results.update({f"ppl/{key}": v for key, v in perplexities(llm, args).items()})
        print("ppl: " + ", ".join(f"{r}/{b} {results[f'ppl/{r}/{b}']:.3f}" for r, b in rows(args)),
              flush=True)
        save()
    return results


def report(results: dict, args) -> str:
    """Markdown tables of a results file: accuracy (%) per length, task and row by budget; accuracy per
    depth bucket; perplexity."""
    head = [f"| task | configuration | {' | '.join(map(str, args.budgets))} |",
            f"|---|---|{'---|' * len(args.budgets)}"]
    out = []
    for length in sorted(args.lengths, reverse=True):
        lines = [_line(task, row, [accuracy(results.get(f"{task}/{length}/{row}/{_budget(row, b)}"))
                                   for b in args.budgets], lambda c: f"{c:.0f}")
                 for task in args.tasks for row in ["dense", *args.policies]]
        if any(lines):
            out += [f"### {length} tokens: accuracy (%)", "", *head, *filter(None, lines), ""]
    depth_head = ["| task | length | configuration | budget | n | "
                  + " | ".join(f"{100 * b // DEPTH_BUCKETS}-{100 * (b + 1) // DEPTH_BUCKETS}%"
                               for b in range(DEPTH_BUCKETS)) + " | keys read / step | drift reselections |",
                  "|---|---|---|---|---|" + "---|" * (DEPTH_BUCKETS + 2)]
    depth_lines = []
    for task in args.tasks:
        for length in sorted(args.lengths):
            for row, budget in rows(args):
                cell = results.get(f"{task}/{length}/{row}/{budget}")
                if isinstance(cell, dict) and cell["right"]:
                    cells = " | ".join("-" if c is None else f"{c:.0f}" for c in by_depth(cell))
                    steps = cell.get("steps", 0)
                    read = f"{cell['keys_read'] / steps:.0f}" if steps else "-"
                    drift = f"{cell['drift']:.0f}" if steps else "-"
                    depth_lines.append(f"| {task} | {length} | {row} | {budget or '-'} "
                                       f"| {len(cell['right'])} | {cells} | {read} | {drift} |")
    if depth_lines:
        out += ["### Accuracy (%) by depth of the answer in the document", "", *depth_head, *depth_lines, ""]
    dense = results.get("ppl/dense/None")
    if dense:
        def change(c: float) -> str:
            return f"{c:.3f} ({100 * (c / dense - 1):+.1f}%)"

        lines = [_line("ppl", row, [results.get(f"ppl/{row}/{_budget(row, b)}") for b in args.budgets],
                       (lambda c: f"{c:.3f}") if row == "dense" else change)
                 for row in ["dense", *args.policies]]
        out += [f"### Perplexity at {args.ppl_length} tokens (change vs dense)", "", *head,
                *filter(None, lines)]
    return "\n".join(out)


def _budget(row: str, budget: int) -> int | None:
    return None if row == "dense" else budget


def _line(task: str, row: str, cells: list[float | None], fmt: Callable[[float], str]) -> str:
    """One table row, "" when the row has no cell; missing cells print as "-"."""
    if all(c is None for c in cells):
        return ""
    return f"| {task} | {row} | {' | '.join('-' if c is None else fmt(c) for c in cells)} |"


def _set_policy(llm: LLM, row: str) -> None:
    """Row "quest" uses the engine's page score and retrieval heads' local window; "quest:bound" names
    its own score, "hierarchical:mean:256" its score and window (retrieval_local_tokens). Options after
    "@" switch the levers in place (ROW_OPTIONS; absent, the engine's): "hierarchical@obs=32"
    (prompt-aware selection over the last 32 prompt queries), "@min_recall=0.9" (the recall guard),
    "@interval=16" (decode steps a selection is kept), "@heads=query" (per query head, not per KV group),
    "@top_p=0.9" (Twilight's adaptive budget; "top_p_floor=128" its floor in tokens), "@drift=0.9"
    (reselect on query drift). Options combine: "hierarchical@obs=32,interval=16"."""
    spec, _, options = row.partition("@")
    name, score, local = (spec.split(":") + ["", ""])[:3]
    opts = dict(o.split("=") for o in options.split(",") if o)
    unknown = set(opts) - set(ROW_OPTIONS)
    if unknown:
        raise SystemExit(f"unknown row option(s) {sorted(unknown)} in {row!r}: expected {ROW_OPTIONS}")
    engine = llm.engine
    args, backend, config = engine.args, engine.backend, engine.sparse_config
    heads = opts.get("heads", "query" if config.per_query_head else "kv")
    if (heads == "query") != backend.per_query_head:
        backend.set_selection(heads == "query")
    top_p, drift = float(opts.get("top_p", config.top_p)), float(opts.get("drift", config.drift))
    backend.set_adaptive(top_p, int(opts.get("top_p_floor", config.top_p_floor)), drift)
    backend.set_policy(name, score or args.sparse_page_score, int(local or args.retrieval_local_tokens))
    backend.observation_window = int(opts.get("obs", config.observation_window))
    backend.min_recall = float(opts.get("min_recall", config.min_recall))
    backend.selector_interval = int(opts.get("interval", config.selector_interval))
    engine.allocator.uncached_tail = max(1, backend.observation_window)


def _engine_arg(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle", "multikey"], choices=list(TASKS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--policies", nargs="*", default=["hierarchical", "quest", "hip", "recent"],
                        help="sparse rows; POLICY:SCORE[:LOCAL][@OPTION=VALUE,...] picks the page score, the "
                             "retrieval heads' local window and the levers obs, min_recall, interval, heads, "
                             "top_p, top_p_floor, drift "
                             "(e.g. quest:bound, hierarchical:mean:256, hierarchical@obs=32,interval=16)")
    parser.add_argument("--samples", type=int, default=50, help="questions per task and length")
    parser.add_argument("--needles", type=int, default=None,
                        help="facts (and questions) per haystack (default: the task's, 25 or 10 or 5)")
    parser.add_argument("--batch", type=int, default=100, help="max_num_seqs of the engine")
    parser.add_argument("--kv-cache", default="2GiB")
    parser.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--ppl-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quality.json", help="results, resumed if present")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra EngineArgs for the engine, e.g. prefill_local_tokens=8192 (repeatable)")
    parser.add_argument("--report", action="store_true", help="print --out's tables as markdown, run nothing")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.out).read_text()), args))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
