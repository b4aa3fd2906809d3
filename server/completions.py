"""POST /v1/completions: prompts in (text, token ids, or lists of either), `text_completion` objects out.

`echo` puts the prompt before each choice's text; with `logprobs` too, the choice's logprobs start with
the prompt's tokens (computed during the prefill: `prompt_logprobs`), the first of them null, which is
what lm-evaluation-harness reads to score continuations.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from needle.server.errors import bad_request
from needle.server.generation import ChoiceDelta, Generation
from needle.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from needle.server.sse import TextOffsets, completion_logprobs, event_stream, sse
from needle.server.state import ServerState


async def prompt_ids(state: ServerState, prompt: Any) -> list[list[int]]:
    """Every accepted prompt form, as a list of token-id prompts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    prompts = []
    for item in prompt:
        prompts.append(await asyncio.to_thread(state.encode, item) if isinstance(item, str) else list(item))
    return prompts


async def create_completion(state: ServerState, body: CompletionRequest, receive: Any) -> Any:
    state.ready()
    state.check_model(body.model)
    body.check_stream_options()
    body.refuse_unsupported()
    scored = body.echo and body.logprobs is not None
    params = body.sampling_params(body.max_tokens, body.logprobs,
                                  prompt_logprobs=body.logprobs if scored else None,
                                  structured=body.structured_outputs(),
                                  defaults=state.ready().sampling_defaults)
    prompts = await prompt_ids(state, body.prompt)
    gen = await state.generation("cmpl", prompts, params)
    echoes = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    if body.stream:
        return _stream(state, body, gen, echoes)
    results = await gen.run(receive)
    choices = []
    for i, r in enumerate(results):
        k = i // params.n
        lps = None
        if scored:
            lps = completion_logprobs(prompts[k] + r.token_ids, _prompt_entries(gen, k) + r.logprobs,
                                      body.logprobs, state.token_bytes, TextOffsets())
        elif body.logprobs is not None:
            lps = completion_logprobs(r.token_ids, r.logprobs, body.logprobs, state.token_bytes,
                                      TextOffsets(len(echoes[k])))
        choices.append(CompletionChoice(index=i, text=echoes[k] + r.text, logprobs=lps,
                                        finish_reason=r.finish_reason, stop_reason=r.stop_reason))
    response = CompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                  usage=gen.usage())
    return JSONResponse(response.model_dump())


def _prompt_entries(gen: Generation, k: int) -> list[dict[int, float] | None]:
    """Prompt k's logprob entries (all null if the request ended before its prefill did)."""
    return gen.prompt_logprobs.get(k) or [None] * len(gen.prompts[k])


def _stream(state: ServerState, body: CompletionRequest, gen: Generation,
            echoes: list[str]) -> StreamingResponse:
    """Each choice's echo goes out just before its first delta: by then its prompt logprobs are in."""
    n, usage = gen.params.n, body.include_usage
    scored = body.echo and body.logprobs is not None
    offsets = [TextOffsets(0 if scored else len(echoes[i // n])) for i in range(len(echoes) * n)]
    echoed: set[int] = set()

    def chunk(choices: list[CompletionChoice], with_usage: UsageInfo | None = None) -> str:
        response = CompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                      usage=with_usage)
        return sse(response, keep_usage=usage)

    def echo(index: int) -> str:
        echoed.add(index)
        k = index // n
        lps: CompletionLogprobs | None = None
        if scored:
            lps = completion_logprobs(gen.prompts[k], _prompt_entries(gen, k), body.logprobs,
                                      state.token_bytes, offsets[index])
        return chunk([CompletionChoice(index=index, text=echoes[k], logprobs=lps)])

    def on_delta(delta: ChoiceDelta) -> str:
        head = echo(delta.index) if body.echo and delta.index not in echoed else ""
        out, lps = delta.output, None
        if not (out.text or out.finish_reason or body.logprobs is not None):
            return head
        if body.logprobs is not None:
            lps = completion_logprobs(out.token_ids, out.logprobs or [], body.logprobs, state.token_bytes,
                                      offsets[delta.index])
        return head + chunk([CompletionChoice(index=delta.index, text=out.text, logprobs=lps,
                                              finish_reason=out.finish_reason, stop_reason=out.stop_reason)])

    tail = (lambda: [chunk([], gen.usage())]) if usage else list
    return StreamingResponse(event_stream(gen.deltas(), [], on_delta, tail, gen.release),
                             media_type="text/event-stream", background=BackgroundTask(gen.release))
