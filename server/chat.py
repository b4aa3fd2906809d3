"""POST /v1/chat/completions: messages through the tokenizer's chat template, `chat.completion` out."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from needle.server.generation import ChoiceDelta, Generation
from needle.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    UsageInfo,
)
from needle.server.sse import chat_logprobs, event_stream, sse
from needle.server.state import ServerState


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, receive: Any) -> Any:
    state.ready()
    state.check_model(body.model)
    body.check_stream_options()
    top_n = body.logprobs_count()
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = body.sampling_params(max_tokens, top_n)
    prompt = await asyncio.to_thread(state.chat_prompt_ids, body.messages, body.add_generation_prompt)
    gen = await state.generation("chatcmpl", [prompt], params)
    if body.stream:
        return _stream(state, body, gen, top_n)
    results = await gen.run(receive)
    choices = [
        ChatChoice(index=i, message=ChatMessageOut(content=r.text), finish_reason=r.finish_reason,
                   stop_reason=r.stop_reason,
                   logprobs=None if top_n is None else chat_logprobs(r.token_ids, r.logprobs, top_n,
                                                                     state.token_bytes))
        for i, r in enumerate(results)]
    response = ChatCompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                      usage=gen.usage())
    return JSONResponse(response.model_dump())


def _stream(state: ServerState, body: ChatCompletionRequest, gen: Generation,
            top_n: int | None) -> StreamingResponse:
    usage = body.include_usage

    def chunk(choices: list[ChatChunkChoice], with_usage: UsageInfo | None = None) -> str:
        response = ChatCompletionChunk(id=gen.request_id, model=state.model_name, choices=choices,
                                       usage=with_usage)
        return sse(response, keep_usage=usage)

    def on_delta(delta: ChoiceDelta) -> str:
        out = delta.output
        if not (out.text or out.finish_reason or top_n is not None):
            return ""
        lps = None if top_n is None else chat_logprobs(out.token_ids, out.logprobs or [], top_n,
                                                       state.token_bytes)
        return chunk([ChatChunkChoice(index=delta.index, delta={"content": out.text} if out.text else {},
                                      logprobs=lps, finish_reason=out.finish_reason)])

    head = [chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            for i in range(gen.params.n)]
    tail = (lambda: [chunk([], gen.usage())]) if usage else list
    return StreamingResponse(event_stream(gen.deltas(), head, on_delta, tail, gen.release),
                             media_type="text/event-stream", background=BackgroundTask(gen.release))
