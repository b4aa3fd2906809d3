"""Quality harness: retrieval accuracy and long-document perplexity, dense vs sparse configurations.

    python -m bench.quality --lengths 8192 --budgets 1024 --samples 50 --out quality.json

Retrieval tasks put `--needles` keyed needles (7-digit values) into each haystack and ask for every key,
so the questions of one haystack share its prefilled prefix (prefix caching): a sample costs a short
question prefill plus ~8 decode steps; the answer is right when its 7 digits match.
  passkey:  "The pass key of <name> is <value>." lines in a repetitive noise haystack;
  needle:   "The secret number of <name> is <value>." sentences in Python standard-library source;
  multikey: like needle, but every key (all but the last when the count is odd) has a twin sharing
            its first word (amber-falcon, amber-heron), and both are asked, so the model must tell
            near-identical keys apart.
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
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from bench.texts import stdlib_modules
from needle.attention.base import AttentionMetadata
from needle.engine.llm import LLM
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("amber azure brisk cedar coral dusky ember frost golden hazel indigo jade lunar maple "
         "misty noble ochre olive pearl quiet rapid rusty silver solar stony tawny umber velvet windy "
         "zesty").split()
ANIMALS = ("falcon heron otter badger lynx marten osprey raven stoat tapir viper walrus yak zebra bison "
           "condor dingo egret ferret gecko ibis jackal koala lemur").split()
HAYSTACK_MODULES = ("argparse", "textwrap", "difflib", "inspect", "pathlib", "typing", "dataclasses")
PPL_MODULES = ("collections/__init__", "functools", "subprocess", "tarfile", "logging/__init__")


def keys_for(task: str, count: int, rng: random.Random) -> list[str]:
    pairs = [f"{w}-{a}" for w in WORDS for a in ANIMALS]
    if task != "multikey":
        return rng.sample(pairs, count)
    first = rng.sample(WORDS, -(-count // 2))
    return [f"{w}-{a}" for w in first for a in rng.sample(ANIMALS, 2)][:count]


def pieces(tokenizer, text: str) -> list[int]:
    """Ids of a piece spliced into a prompt: no special tokens (Gemma's tokenizer would put a BOS before
    every piece; SmolLM2's adds none, so its prompts are unchanged)."""
    return tokenizer.encode(text, add_special_tokens=False)


def haystack(tokenizer, task: str, length: int, needles: int, seed: int, group: int):
    """-> (prefix ids shared by the group's questions, [(question ids, answer)])."""
    rng = random.Random(f"{task}/{length}/{seed}/{group}")
    keys = keys_for(task, needles, rng)
    values = [str(rng.randrange(10**6, 10**7)) for _ in keys]
    noun = "pass key" if task == "passkey" else "secret number"
    needle_ids = [pieces(tokenizer, f" The {noun} of {k} is {v}. ")
                  for k, v in zip(keys, values, strict=True)]
    if task == "passkey":
        filler = pieces(tokenizer, NOISE * (length // 10))
    else:  # each group reads the standard library from its own offset
        text = stdlib_modules(HAYSTACK_MODULES)
        filler = pieces(tokenizer, text[group * len(text) // 16:] + text)
    bos = tokenizer.encode("")  # the BOS alone, where the tokenizer adds one
    head = bos + pieces(tokenizer, f"Below are {len(keys)} {noun}s hidden in a long text. Remember them.\n")
    fill = length - len(head) - sum(map(len, needle_ids)) - 64  # room for padding, question and answer
    filler = filler[:fill]
    order = list(range(len(keys)))
    rng.shuffle(order)
    ids = list(head)
    cut = [j * fill // (len(order) + 1) for j in range(len(order) + 2)]
    for j, n in enumerate(order):  # needles at depths 1/(n+1) .. n/(n+1), in random key order
        ids += filler[cut[j]:cut[j + 1]] + needle_ids[n]
    ids += filler[cut[-2]:]
    questions = [(pieces(tokenizer, f"\nWhat is the {noun} of {k}? The {noun} of {k} is"), v)
                 for k, v in zip(keys, values, strict=True)]
    return ids, questions


def page_aligned(prefix: list[int], question: list[int], newline: list[int], page: int) -> list[int]:
    """prefix + newlines + question, padded so that every token but the last fills whole KV pages: once
    one row has run a question, the prefix cache holds all of it, and the other rows (policies and
    budgets prefill alike) only recompute the last token before decoding."""
    pad = (1 - len(prefix) - len(question)) % page
    return prefix + newline * pad + question


def answers_right(llm: LLM, prompts: list[list[int]], overrides: list[AttentionOverride],
                  expected: list[str], distinct: int) -> list[bool]:
    """Greedy answers. The first prompt runs alone, then the rest of the first `distinct`, so that the
    shared prefix and then every question are in the prefix cache before their repeats run."""
    params = [SamplingParams(temperature=0.0, max_tokens=9, attention=o) for o in overrides]
    outs = [out for lo, hi in ((0, 1), (1, distinct), (distinct, len(prompts)))
            for out in llm.generate(prompts[lo:hi], params[lo:hi])]
    texts = [out.outputs[0].text.replace(" ", "")[:9] for out in outs]
    return [answer in text for text, answer in zip(texts, expected, strict=True)]


def rows(args) -> list[tuple[str, int | None]]:
    """(row, budget): dense first, then every policy (the streaming baseline included) at every budget."""
    return [("dense", None)] + [(p, b) for p in args.policies for b in args.budgets]


def retrieval(llm: LLM, args, task: str, length: int) -> dict[str, float]:
    """Accuracy (%) of every row on one task and length, over samples // needles haystacks."""
    hits: Counter[str] = Counter()
    asked = 0
    newline, page = pieces(llm.tokenizer, "\n"), llm.engine.args.page_size
    for group in tqdm(range(max(1, args.samples // args.needles)), desc=f"{task} {length}", leave=False):
        prefix, questions = haystack(llm.tokenizer, task, length, args.needles, args.seed, group)
        asked += len(questions)
        prompts = [page_aligned(prefix, q, newline, page) for q, _ in questions]
        expected = [a for _, a in questions]
        n = len(prompts)
        right = answers_right(llm, prompts, [AttentionOverride(mode="dense")] * n, expected, n)
        hits["dense/None"] += sum(right)
        for policy in args.policies:
            _set_policy(llm, policy)
            copies = len(args.budgets)
            overrides = [AttentionOverride(mode="sparse", token_budget=b)
                         for b in args.budgets for _ in range(n)]  # budget-major, like the prompts
            right = answers_right(llm, prompts * copies, overrides, expected * copies, n)
            for j, b in enumerate(args.budgets):
                hits[f"{policy}/{b}"] += sum(right[j * n:(j + 1) * n])
    return {key: 100.0 * count / asked for key, count in hits.items()}


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
    llm = LLM(attention="sparse", max_num_seqs=args.batch, sparse_recall_sample=0.0,
              kv_cache_memory=args.kv_cache, **dict(_engine_arg(kv) for kv in args.engine_arg))
    todo = [(t, n) for t in args.tasks for n in args.lengths
            if any(f"{t}/{n}/{r}/{b}" not in results for r, b in rows(args))]
    for task, length in tqdm(todo, desc="tasks"):
        t0 = time.time()
        for key, acc in retrieval(llm, args, task, length).items():
            results[f"{task}/{length}/{key}"] = acc
        print(f"{task}/{length} ({time.time() - t0:.0f}s): " + ", ".join(
            f"{r}/{b} {results[f'{task}/{length}/{r}/{b}']:.0f}" for r, b in rows(args)), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # saved after each, as runs are long
    if args.ppl and any(f"ppl/{r}/{b}" not in results for r, b in rows(args)):
        results.update({f"ppl/{key}": v for key, v in perplexities(llm, args).items()})
        print("ppl: " + ", ".join(f"{r}/{b} {results[f'ppl/{r}/{b}']:.3f}" for r, b in rows(args)),
              flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def report(results: dict, args) -> str:
    """Markdown tables of a results file: accuracy (%) per length, task and row by budget; perplexity."""
    head = [f"| task | configuration | {' | '.join(map(str, args.budgets))} |",
            f"|---|---|{'---|' * len(args.budgets)}"]
    out = []
    for length in sorted(args.lengths, reverse=True):
        lines = [_line(task, row, [results.get(f"{task}/{length}/{row}/{_budget(row, b)}")
                                   for b in args.budgets], lambda c: f"{c:.0f}")
                 for task in args.tasks for row in ["dense", *args.policies]]
        if any(lines):
            out += [f"### {length} tokens: accuracy (%)", "", *head, *filter(None, lines), ""]
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
    its own score, "hierarchical:mean:256" its score and window (retrieval_local_tokens)."""
    name, score, local = (row.split(":") + ["", ""])[:3]
    args = llm.engine.args
    llm.engine.backend.set_policy(name, score or args.sparse_page_score,
                                         int(local or args.retrieval_local_tokens))


def _engine_arg(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle", "multikey"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--policies", nargs="+", default=["hierarchical", "quest", "hip", "recent"],
                        help="sparse rows; POLICY:SCORE[:LOCAL] picks the page score and the retrieval "
                             "heads' local window (e.g. quest:bound, hierarchical:mean:256)")
    parser.add_argument("--samples", type=int, default=50, help="questions per task and length")
    parser.add_argument("--needles", type=int, default=25, help="needles (and questions) per haystack")
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
