"""Offline batch generation, as vLLM users write it: LLM(model).generate(prompts, params)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from needle.engine.config import EngineArgs
from needle.engine.llm_engine import LLMEngine
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.scheduler.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run all prompts to completion in one continuous batch; results in prompt order. As in vLLM,
        sampling_params is one for all prompts or a list with one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, Seq):
            default = SamplingParams(**self.engine.sampling_defaults)  # --generation-config's
            sampling_params = [sampling_params or default] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, params)
            order.append(rid)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                outputs, _ = self.engine.step()
                for out in outputs:
                    merge(results, out)
                    bar.update(int(out.finished))
        return [results[rid] for rid in order]


def merge(results: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Fold one incremental output into the accumulated one."""
    acc = results.get(delta.request_id)
    if acc is None:
        acc = results[delta.request_id] = RequestOutput(
            delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        cur = by_index.get(c.index)
        if cur is None:
            cur = by_index[c.index] = CompletionOutput(c.index, "", [], logprobs=[] if c.logprobs is not None
                                                       else None)
        cur.text += c.text
        cur.token_ids = cur.token_ids + c.token_ids
        if c.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + c.logprobs
        cur.finish_reason, cur.stop_reason = c.finish_reason, c.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished, acc.metrics, acc.num_cached_tokens = delta.finished, delta.metrics, delta.num_cached_tokens
    acc.error = acc.error or delta.error
    acc.prompt_logprobs = acc.prompt_logprobs or delta.prompt_logprobs
    return acc
