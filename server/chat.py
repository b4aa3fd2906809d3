"""POST /v1/chat/completions: messages through the tokenizer's chat template, `chat.completion` out.

`response_format` and the tool fields (server/tools.py) become a constrained-decoding grammar; tool
calls are read from each finished choice. A stream with tools active sends each choice's message in
one delta when the choice finishes: a call's JSON can only be known to be a call once it is whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from needle.server.generation import ChoiceDelta, ChoiceResult, Generation
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
from needle.server.tools import ToolPlan, plan_tools, with_tool_prompt


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, receive: Any) -> Any:
    state.ready()
    state.check_model(body.model)
    body.check_stream_options()
    body.refuse_unsupported()
    top_n = body.logprobs_count()
    plan = plan_tools(body, state.template_has_tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    structured = plan.structured() or body.structured_outputs()
    params = body.sampling_params(max_tokens, top_n, structured=structured,
                                  defaults=state.ready().sampling_defaults)
    messages, template_tools = body.messages, None
    if plan.active and state.template_has_tools:
        template_tools = plan.tools
    elif plan.active:
        messages = with_tool_prompt(messages, plan)
    prompt = await asyncio.to_thread(state.chat_prompt_ids, messages, body.add_generation_prompt,
                                     template_tools)
    gen = await state.generation("chatcmpl", [prompt], params)
    if body.stream:
        return _stream(state, body, gen, top_n, plan)
    results = await gen.run(receive)
    choices = [
        ChatChoice(index=i, message=message, finish_reason=finish, stop_reason=r.stop_reason,
                   logprobs=None if top_n is None else chat_logprobs(r.token_ids, r.logprobs, top_n,
                                                                     state.token_bytes))
        for i, r in enumerate(results) for message, finish in [_message(plan, r.text, r.finish_reason)]]
    response = ChatCompletionResponse(id=gen.request_id, model=state.model_name, choices=choices,
                                      usage=gen.usage())
    return JSONResponse(response.model_dump())


def _message(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
    """A finished choice's message and finish_reason ("tool_calls" when it called tools)."""
    if not plan.active:
        return ChatMessageOut(content=text), finish_reason
    content, calls = plan.parse(text)
    return ChatMessageOut(content=content, tool_calls=calls), "tool_calls" if calls else finish_reason


def _stream(state: ServerState, body: ChatCompletionRequest, gen: Generation,
            top_n: int | None, plan: ToolPlan) -> StreamingResponse:
    usage = body.include_usage
    held = [ChoiceResult() for _ in range(gen.params.n)]  # tools active: each choice's text so far

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
        change: dict[str, Any] = {"content": out.text} if out.text else {}
        finish = out.finish_reason
        if plan.active:
            held[delta.index].pieces.append(out.text)
            change = {}
            if finish:
                message, finish = _message(plan, held[delta.index].text, finish)
                change = {"content": message.content} if message.content else {}
                if message.tool_calls:
                    change["tool_calls"] = [{"index": j, **call.model_dump()}
                                            for j, call in enumerate(message.tool_calls)]
            elif lps is None:
                return ""
        return chunk([ChatChunkChoice(index=delta.index, delta=change, logprobs=lps, finish_reason=finish)])

    head = [chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            for i in range(gen.params.n)]
    tail = (lambda: [chunk([], gen.usage())]) if usage else list
    return StreamingResponse(event_stream(gen.deltas(), head, on_delta, tail, gen.release),
                             media_type="text/event-stream", background=BackgroundTask(gen.release))
