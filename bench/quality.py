"""Quality harness: retrieval accuracy and long-document perplexity, dense vs sparse configurations.

    python -m bench.quality --lengths 8192 --budgets 1024 --samples 50 --out quality.json

Retrieval tasks put many keyed needles (7-digit values) into one haystack and ask for one key per
sample, so all samples of a (task, length) share one prefilled prefix (prefix caching) and each sample
costs a short question prefill plus ~8 decode steps; the answer is right when its 7 digits match.
  passkey:  "The pass key of <name> is <value>." lines in a repetitive noise haystack;
  needle:   "The secret number of <name> is <value>." sentences in Python standard-library source;
  multikey: like needle, but every key has a twin sharing its first word (amber-falcon, amber-heron),
            and both are asked, so the model must tell near-identical keys apart.
Perplexity: the last `--ppl-tokens` tokens of a long standard-library document, teacher-forced one
decode step at a time after a prefill of the rest, so the sparse decode path (selection) is measured.

Configurations: dense; streaming (StreamingLLM: every head keeps sink + local = budget); and each
sparse policy with the shipped head profile. Policies are switched on one engine so they share the
prefill; budgets are per-request overrides.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

from attention.base import AttentionMetadata
from attention.policies import POLICIES
from engine.llm import LLM
from engine.sampling_params import AttentionOverride, SamplingParams

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("amber azure brisk cedar coral dusky ember frost golden hazel indigo jade lunar maple "
         "misty noble ochre olive pearl quiet rapid rusty silver solar stony tawny umber velvet windy "
         "zesty").split()
ANIMALS = ("falcon heron otter badger lynx marten osprey raven stoat tapir viper walrus yak zebra bison "
           "condor dingo egret ferret gecko ibis jackal koala lemur").split()
HAYSTACK_MODULES = ("argparse", "textwrap", "difflib", "inspect", "pathlib", "typing", "dataclasses")
PPL_MODULES = ("collections/__init__", "functools", "subprocess", "tarfile", "logging/__init__")


def stdlib_text(modules: tuple[str, ...]) -> str:
    """Source + docstrings of standard-library modules: natural English-and-code text on every install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / f"{m}.py").read_text() for m in modules)


def keys_for(task: str, count: int, rng: random.Random) -> list[str]:
    pairs = [f"{w}-{a}" for w in WORDS for a in ANIMALS]
    if task != "multikey":
        return rng.sample(pairs, count)
    first = rng.sample(WORDS, count // 2)
    return [f"{w}-{a}" for w in first for a in rng.sample(ANIMALS, 2)]


def haystack(tokenizer, task: str, length: int, samples: int, seed: int):
    """-> (prefix ids shared by every sample, [(question ids, answer)])."""
    rng = random.Random(f"{task}/{length}/{seed}")
    keys = keys_for(task, samples, rng)
    values = [str(rng.randrange(10**6, 10**7)) for _ in keys]
    noun = "pass key" if task == "passkey" else "secret number"
    needles = [tokenizer.encode(f" The {noun} of {k} is {v}. ") for k, v in zip(keys, values, strict=True)]
    text = NOISE * (length // 10) if task == "passkey" else stdlib_text(HAYSTACK_MODULES)
    head = tokenizer.encode(f"Below are {len(keys)} {noun}s hidden in a long text. Remember them.\n")
    fill = length - len(head) - sum(map(len, needles)) - 40  # room for the question and answer
    filler = tokenizer.encode(text)[:fill]
    order = list(range(len(keys)))
    rng.shuffle(order)
    ids = list(head)
    for j, n in enumerate(order):  # needles spread evenly over the depth, in random key order
        ids += filler[j * fill // len(order):(j + 1) * fill // len(order)] + needles[n]
    questions = [(tokenizer.encode(f"\nWhat is the {noun} of {k}? The {noun} of {k} is"), v)
                 for k, v in zip(keys, values, strict=True)]
    return ids, questions


def accuracy(llm: LLM, prefix: list[int], questions, override: AttentionOverride | None) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=9, attention=override)
    first = llm.generate([prefix + questions[0][0]], params)  # fills the prefix cache for the rest
    rest = llm.generate([prefix + q for q, _ in questions[1:]], params)
    hits = [answer in out.outputs[0].text.replace(" ", "")[:9] for out, (_, answer)
            in zip(first + rest, questions, strict=True)]
    return 100.0 * sum(hits) / len(hits)


def decode_perplexity(llm: LLM, ids: list[int], eval_tokens: int, budget: int | None) -> float:
    """exp(mean NLL) of the last eval_tokens of ids, each predicted by a decode step (teacher forcing).
    Drives the model directly over pages 0.. of the pool: run it on an otherwise idle engine."""
    engine = llm.engine
    backend, model, page = engine.runner.backend, engine.model, engine.pool.spec.page_size
    table = torch.arange(-(-len(ids) // page), dtype=torch.int32)[None]
    mode = "dense" if engine.args.attention == "dense" else "sparse"
    nll, start, chunk = 0.0, 0, engine.args.max_num_batched_tokens
    split = len(ids) - eval_tokens
    with torch.inference_mode():
        while start < len(ids) - 1:  # the last forward is position len - 2, predicting len - 1
            n = min(chunk, split - start) if start < split else 1
            meta = _single_meta(start, n, table, page, mode, budget or 0)
            backend.begin_step(meta)
            hidden = model(torch.tensor(ids[start:start + n]), backend, meta)
            start += n
            if start >= split:
                logits = model.logits(hidden[-1:]).float()
                nll -= torch.log_softmax(logits, -1)[0, ids[start]].item()
        backend.release(0)
    return math.exp(nll / eval_tokens)


def _single_meta(start: int, n: int, table: torch.Tensor, page: int, mode: str, budget: int):
    pos = torch.arange(start, start + n)
    slots = table[0, pos // page].long() * page + pos % page
    return AttentionMetadata(
        seq_ids=[0], query_lens=[n], context_lens=[start + n], query_start_loc=torch.tensor([0, n]),
        context_lens_t=torch.tensor([start + n], dtype=torch.int32), block_tables=table, slot_mapping=slots,
        positions=pos, modes=[mode], token_budgets=[budget])


def configs(args) -> list[tuple[str, dict, list[tuple[str, int | None]]]]:
    """(engine label, engine args, [(row name, budget)]): every row shares its engine's prefill. The most
    telling engines come first, so a run cut short still compares sparse with dense."""
    common = dict(max_num_seqs=args.batch, sparse_recall_sample=0.0, kv_cache_memory=args.kv_cache,
                  **dict(_engine_arg(kv) for kv in args.engine_arg))
    rows = [(p, b) for p in args.policies for b in args.budgets]
    sparse = ("sparse", dict(common, attention="sparse"), rows)
    dense = ("dense", dict(common, attention="dense"), [("dense", None)])
    streaming = [(f"streaming-{b}", dict(common, attention="sparse", streaming_ratio=1.0, local_tokens=b - 64,
                                         sink_tokens=64), [("streaming", b)]) for b in args.budgets]
    return [sparse, dense, *streaming]


def _engine_arg(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args) -> dict:
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for label, engine_args, rows in configs(args):
        todo = [(t, n) for t in args.tasks for n in args.lengths
                if any(f"{t}/{n}/{r}/{b}" not in results for r, b in rows)]
        if not todo and not (args.ppl and any(f"ppl/{r}/{b}" not in results for r, b in rows)):
            continue
        llm = LLM(**engine_args)
        for task, length in tqdm(todo, desc=label):
            prefix, questions = haystack(llm.tokenizer, task, length, args.samples, args.seed)
            for row, budget in rows:
                override = AttentionOverride(mode="sparse", token_budget=budget) if budget else None
                _record(results, f"{task}/{length}/{row}/{budget}", llm, row, args.out,
                        functools.partial(accuracy, llm, prefix, questions, override))
        if args.ppl:
            doc = llm.tokenizer.encode(stdlib_text(PPL_MODULES))[: args.ppl_length]
            for row, budget in rows:
                _record(results, f"ppl/{row}/{budget}", llm, row, args.out,
                        functools.partial(decode_perplexity, llm, doc, args.ppl_tokens, budget))
        del llm
    return results


def _record(results: dict, key: str, llm: LLM, row: str, out: str, measure) -> None:
    """Measure one result unless the (resumed) results hold it; save after each, as runs are long."""
    if key in results:
        return
    if row in POLICIES:
        llm.engine.runner.backend.set_policy(row)
    t0 = time.time()
    results[key] = measure()
    print(f"{key}: {results[key]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "needle", "multikey"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--policies", nargs="+", default=["hierarchical", "quest", "hip"])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="max_num_seqs of each engine")
    parser.add_argument("--kv-cache", default="2GiB")
    parser.add_argument("--ppl", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ppl-length", type=int, default=8192)
    parser.add_argument("--ppl-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quality.json", help="results, resumed if present")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra EngineArgs for every engine, e.g. prefill_local_tokens=8192 (repeatable)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
