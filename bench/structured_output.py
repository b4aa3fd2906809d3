"""Constrained decoding libraries on this machine: grammar compile time and per-token mask cost.

    .venv/bin/python -m bench.structured_output [--repeats 3]

For the bundled SmolLM2 tokenizer (49,152 tokens), each library compiles a JSON schema and the
any-JSON grammar (`json_object`), then walks the tokens of a valid answer: per token, the allowed-token
bitmask is computed and the token consumed, which is exactly the work the sampler adds per
constrained sequence per step. Then needle's own sampler over one step of 8 sampled rows: all plain,
and one of them constrained (xgrammar), to show what a constrained row adds and that plain rows pay
nothing. Prints markdown tables (ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from needle.engine.detokenizer import TokenBytes
from needle.engine.loader import bundled_gguf, gguf_to_directory
from needle.engine.sampler import Sampler
from needle.engine.structured_output import Grammars
from needle.scheduler.sampling_params import SamplingParams, StructuredOutputsParams
from needle.scheduler.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
          "tags": ["maths", "engines", "poetry"], "address": {"city": "London", "zip": "W1"}}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # time every compile
        self.mask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict | None):
        xgr = self.xgr
        compiled = (self.compiler.compile_builtin_json_grammar() if schema is None
                    else self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True))
        return xgr.GrammarMatcher(compiled)

    def step(self, matcher, token: int) -> None:
        matcher.fill_next_token_bitmask(self.mask)
        assert matcher.accept_token(token), token


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict | None):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                             defaults={"whitespace_flexible": False})
        return self.ll.LLMatcher(self.tokenizer, grammar)

    def step(self, matcher, token: int) -> None:
        self.llt.fill_next_token_bitmask(matcher, self.mask, 0)
        assert matcher.consume_token(token), matcher.get_error()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int):
        from outlines_core import Vocabulary

        to_bytes = TokenBytes(tokenizer)
        pieces: dict[bytes, list[int]] = {}
        for tid in range(len(tokenizer)):
            if tid != tokenizer.eos_token_id and tid not in tokenizer.all_special_ids:
                pieces.setdefault(to_bytes(tid), []).append(tid)
        pieces.pop(b"", None)
        self.vocabulary = Vocabulary(tokenizer.eos_token_id, pieces)
        self.mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict | None):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        # outlines-core has no recursive any-JSON grammar: json_object is approximated by a flat object.
        regex = build_regex_from_schema(json.dumps(schema or {"type": "object"}))
        return Guide(Index(regex, self.vocabulary))

    def step(self, guide, token: int) -> None:
        guide.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())
        guide.advance(token)


def measure(lib, tokens: list[int], schema: dict | None, repeats: int) -> dict[str, float]:
    compile_s, per_token = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        matcher = lib.compile(schema)
        compile_s.append(time.perf_counter() - start)
        for token in tokens:
            start = time.perf_counter()
            lib.step(matcher, token)
            per_token.append(time.perf_counter() - start)
    per_token.sort()
    return {"compile_ms": 1e3 * statistics.median(compile_s),
            "mean_ms": 1e3 * statistics.mean(per_token),
            "p99_ms": 1e3 * per_token[int(0.99 * (len(per_token) - 1))]}


def sampler_rows(grammars: Grammars, constrained: int) -> list[Sequence]:
    """8 sampled sequences, the first `constrained` of them under the schema."""
    seqs = []
    for i in range(8):
        seq = Sequence("r", i, [1, 2, 3], SamplingParams(temperature=0.8, max_tokens=None), 0.0)
        seq.generator = torch.Generator().manual_seed(i)
        if i < constrained:
            grammars.add(seq, grammars.compile(StructuredOutputsParams(json=SCHEMA)))
        seqs.append(seq)
    return seqs


def sampler_steps(tokenizer, vocab: int, steps: int) -> dict[str, float]:
    """Median ms of one Sampler call over 8 sampled rows, none or one constrained, the two settings
    alternating step by step (the machine is shared: neighbours' load falls on both alike); and of the
    grammar work alone (the step's bitmask fill)."""
    grammars = Grammars(tokenizer, vocab, (tokenizer.eos_token_id,))
    sampler = Sampler((tokenizer.eos_token_id,), grammars)
    batches = {"0 of 8 constrained": sampler_rows(grammars, 0),
               "1 of 8 constrained": sampler_rows(grammars, 1)}
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in [*batches, "bitmask fill (1 row)"]}
    for _ in range(steps):
        for name, seqs in batches.items():
            start = time.perf_counter()
            tokens = sampler(logits, seqs)
            times[name].append(time.perf_counter() - start)
            for seq, token in zip(seqs, tokens, strict=True):
                grammars.accept(seq, token)
        start = time.perf_counter()
        grammars.masks(batches["1 of 8 constrained"])
        times["bitmask fill (1 row)"].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(gguf_to_directory(bundled_gguf()))
    vocab = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")))
    print(f"{len(tokens)} answer tokens, vocabulary {vocab}\n")
    print("| library | grammar | init (s) | compile (ms) | mask + advance per token, mean (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        start = time.perf_counter()
        lib = cls(tokenizer, vocab)
        init_s = time.perf_counter() - start
        for label, schema in (("json_schema", SCHEMA), ("json_object", None)):
            r = measure(lib, tokens, schema, args.repeats)
            print(f"| {lib.name} | {label} | {init_s:.2f} | {r['compile_ms']:.1f} | {r['mean_ms']:.3f} "
                  f"| {r['p99_ms']:.3f} |")
    print("\n| needle sampler, 8 sampled rows | ms per step (median) |\n|---|---|")
    for name, ms in sampler_steps(tokenizer, vocab, args.steps).items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
