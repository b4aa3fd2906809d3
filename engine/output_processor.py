"""From sampled token ids to what callers receive: detokenised text, stop checks, `RequestOutput` deltas.

The engine appends each sampled token to its sequence and asks `finish_reason` whether the sequence
ends there; `collect` then turns everything new since the last call into incremental outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from needle.engine.detokenizer import TextState
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.engine.prompt_logprobs import PromptLogprobs
from needle.scheduler.sampling_params import SamplingParams
from needle.scheduler.sequence import Sequence


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[TextState]
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    reported_finished: set[int] = field(default_factory=set)
    error: str | None = None  # a fault of this request's own (non-finite sampling): it ends with it
    prompt_logprobs: PromptLogprobs | None = None  # when asked: filled during the prefill, sent once
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def finish_reason(self, req: Request, seq: Sequence) -> tuple[str, int | str | None] | None:
        """Detokenise the sequence's newest token; -> (reason, stop_reason) if the sequence ends on it."""
        p, token = seq.params, seq.token_ids[-1]
        req.first_token = req.first_token or time.monotonic()
        text = req.texts[seq.index]
        new_text = text.append(self.tokenizer, seq.token_ids, p.skip_special_tokens)
        if seq.num_output >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
            stop = text.find_stop(p.stop, len(new_text), p.include_stop_str_in_output)
            if stop is not None:
                return "stop", stop
        if (p.max_tokens is not None and seq.num_output >= p.max_tokens) or len(seq) >= self.max_model_len:
            return "length", None
        return None

    def collect(self, requests: dict[str, Request]) -> list[RequestOutput]:
        """Incremental outputs of every request that changed; finished requests leave `requests`."""
        outputs = []
        for req in list(requests.values()):
            changed = [c for c in (self._delta(req, i) for i in range(len(req.seqs))) if c is not None]
            if not changed:
                continue
            done = req.finished
            if done:
                req.finished_at = time.monotonic()
                del requests[req.request_id]
            prompt_logprobs = None
            if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
                prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
            outputs.append(RequestOutput(
                req.request_id, req.prompt, req.prompt_ids, changed, done,
                metrics={"arrival_time": req.arrival, "first_scheduled_time": req.first_scheduled or 0.0,
                         "first_token_time": req.first_token or 0.0,
                         "finished_time": req.finished_at or 0.0},
                num_cached_tokens=req.seqs[0].num_cached, error=req.error, prompt_logprobs=prompt_logprobs))
        return outputs

    @staticmethod
    def _delta(req: Request, i: int) -> CompletionOutput | None:
        seq, text = req.seqs[i], req.texts[i]
        if seq.index in req.reported_finished:
            return None
        new_ids = seq.output_ids[text.emitted_tokens:]
        if not new_ids and not seq.is_finished:
            return None
        text.emitted_tokens += len(new_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[text.emitted_logprobs:]
            text.emitted_logprobs = len(seq.logprobs)
        delta = text.take_delta(seq.params.stop, seq.is_finished)
        if seq.is_finished:
            req.reported_finished.add(seq.index)
        return CompletionOutput(seq.index, delta, new_ids, seq.finish_reason, seq.stop_reason, logprobs)
