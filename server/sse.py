"""Server-Sent Events framing and the logprob shapes of both OpenAI APIs.

The engine hands logprobs as one `{token_id: logprob}` dict per generated token (the top-N plus the
sampled token); the two APIs want them as strings, in two different layouts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from needle.server.errors import APIError
from needle.server.generation import ChoiceDelta
from needle.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict, *, keep_usage: bool = True) -> str:
    """One `data: {...}` event. Chunks carry `usage: null` only when the client asked for usage."""
    body = payload.model_dump() if isinstance(payload, BaseModel) else payload
    if not keep_usage:
        body.pop("usage", None)
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(err: APIError) -> str:
    return sse(err.body())


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:n]


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float]], n: int,
                        text_of: Callable[[int], str], offset: int) -> CompletionLogprobs:
    """Legacy completions layout; `offset` is where this piece starts in the choice's text."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=True):
        token = text_of(tid)
        out.tokens.append(token)
        out.token_logprobs.append(entry.get(tid))
        out.top_logprobs.append({text_of(t): lp for t, lp in _top(entry, n)})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], n: int,
                  text_of: Callable[[int], str]) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        token = text_of(tid)
        top = [TopLogprob(token=text_of(t), logprob=lp, bytes=list(text_of(t).encode()))
               for t, lp in _top(entry, n)]
        content.append(TokenLogprob(token=token, logprob=entry.get(tid, -9999.0),
                                    bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


async def event_stream(deltas: AsyncIterator[ChoiceDelta], head: list[str],
                       chunk: Callable[[ChoiceDelta], str], tail: Callable[[], list[str]],
                       release: Callable[[], None]) -> AsyncIterator[str]:
    """The SSE body: `head` events, one event per delta (`chunk` returns "" for a delta with nothing to
    say, e.g. the first bytes of a character still being held back), `tail` events, then [DONE].

    An error after the headers are sent can only travel in-band, as an error event before [DONE].
    Closing this stream (the client left) closes `deltas`, which aborts the engine requests.
    """
    try:
        for event in head:
            yield event
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                event = chunk(delta)
                if event:
                    yield event
        for event in tail():
            yield event
    except APIError as err:
        yield sse_error(err)
    finally:
        release()
    yield DONE
