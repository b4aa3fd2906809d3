"""POST /v1/completions: prompts in (text, token ids, or lists of either), `text_completion` objects out."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from needle.server.errors import bad_request
from needle.server.generation import ChoiceDelta, Generation
from needle.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
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
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported", param="echo")
    params = body.sampling_params(body.max_tokens, body.logprobs)
    prompts = await prompt_ids(state, body.prompt)
    gen = await state.generation("cmpl", prompts, params)
    echoes = [state.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    if body.stream:
        return _stream(state, body, gen, echoes)
    results = await gen.run(receive)
    choices = []
    for i, r in enumerate(results):
        echo = echoes[i // params.n]
        lps = None if body.logprobs is None else completion_logprobs(
            r.token_ids, r.logprobs, body.logprobs, state.token_bytes, TextOffsets(len(echo)))
        choices.append(CompletionChoice(index=i, text=echo + r.text, logprobs=lps,
                                        finish_reason=r.finish_reason, stop_reason=r.stop_reason))
    response = CompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                  usage=gen.usage())
    return JSONResponse(response.model_dump())


def _stream(state: ServerState, body: CompletionRequest, gen: Generation,
            echoes: list[str]) -> StreamingResponse:
    n, usage = gen.params.n, body.include_usage
    offsets = [TextOffsets(len(echoes[i // n])) for i in range(len(echoes) * n)]

    def chunk(choices: list[CompletionChoice], with_usage: UsageInfo | None = None) -> str:
        response = CompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                      usage=with_usage)
        return sse(response, keep_usage=usage)

    def on_delta(delta: ChoiceDelta) -> str:
        out, lps = delta.output, None
        if not (out.text or out.finish_reason or body.logprobs is not None):
            return ""
        if body.logprobs is not None:
            lps = completion_logprobs(out.token_ids, out.logprobs or [], body.logprobs, state.token_bytes,
                                      offsets[delta.index])
        return chunk([CompletionChoice(index=delta.index, text=out.text, logprobs=lps,
                                       finish_reason=out.finish_reason, stop_reason=out.stop_reason)])

    head = [chunk([CompletionChoice(index=i, text=echoes[i // n])]) for i in range(len(offsets))
            if echoes[i // n]]
    tail = (lambda: [chunk([], gen.usage())]) if usage else list
    return StreamingResponse(event_stream(gen.deltas(), head, on_delta, tail, gen.release),
                             media_type="text/event-stream", background=BackgroundTask(gen.release))
