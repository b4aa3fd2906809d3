"""Constrained decoding through xgrammar: one grammar matcher per constrained sequence, and per step
one bitmask of allowed tokens for the constrained rows of the batch, which the sampler applies.

xgrammar was chosen by measurement (BENCHMARKS.md, bench/structured_output.py): on this CPU its mask
costs ~10-40 us per token, against ~50-100 us for llguidance and ~1 ms for outlines-core. Nothing is
imported, built or computed until a request asks for structured output, so other requests pay nothing.
Compiled grammars are cached by schema text (xgrammar's own cache).
"""

from __future__ import annotations

from typing import Any

import torch

from needle.engine.validation import RequestError
from needle.scheduler.sampling_params import StructuredOutputsParams
from needle.scheduler.sequence import Sequence

INSTALL_HINT = "pip install 'needle-serve[structured]' (xgrammar)"


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.matchers: dict[int, Any] = {}  # seq_id -> xgrammar.GrammarMatcher
        self._xgr: Any = None
        self._compiler: Any = None

    def _load(self) -> Any:
        if self._compiler is None:
            if self.tokenizer is None:
                raise RequestError("structured output needs the model's tokenizer, which this model lacks",
                                   param="response_format")
            try:
                import xgrammar
            except ImportError:
                raise RequestError(f"structured output is not installed on this server: {INSTALL_HINT}",
                                   param="response_format") from None
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_token_ids)
            self._xgr, self._compiler = xgrammar, xgrammar.GrammarCompiler(info)
        return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """-> a compiled grammar; RequestError (400) for a schema xgrammar cannot compile."""
        compiler = self._load()
        try:
            # json_object allows any properties; a schema is strict (no properties it does not name).
            # Compact JSON: a small model left free whitespace can spend its whole budget on newlines.
            return compiler.compile_json_schema(spec.schema_text, strict_mode=spec.json is not None,
                                                any_whitespace=False)
        except Exception as err:
            raise RequestError(f"cannot compile the JSON schema: {err}", param="response_format") from None

    def add(self, seq: Sequence, compiled: Any) -> None:
        self.matchers[seq.seq_id] = self._xgr.GrammarMatcher(compiled)

    def masks(self, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
        """Row index -> allowed-token bitmask, for the constrained rows of one step's batch (one
        bitmask tensor filled for all of them)."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not rows:
            return {}
        bitmask = self._xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, i in enumerate(rows):
            self.matchers[seqs[i].seq_id].fill_next_token_bitmask(bitmask, j)
        return {i: bitmask[j] for j, i in enumerate(rows)}

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (one row)."""
        self._xgr.apply_token_bitmask_inplace(logits, mask)

    def accept(self, seq: Sequence, token: int) -> None:
        matcher = self.matchers.get(seq.seq_id)
        if matcher is not None and not matcher.is_terminated():
            matcher.accept_token(token)

    def release(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)
