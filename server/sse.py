"""Server-Sent Events framing and the logprob shapes of both OpenAI APIs.

The engine hands logprobs as one `{token_id: logprob}` dict per generated token (the top-N plus the
sampled token); the two APIs want them as strings, in two different layouts.
"""

from __future__ import annotations

import codecs
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


def token_string(data: bytes) -> str:
    """A token as text; OpenAI writes one that is not whole UTF-8 (part of a character) as 'bytes:\\xNN'."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TextOffsets:
    """Where each token starts in a choice's text, in characters, counted from the tokens' bytes: the
    tokens that together spell one character all start where that character does."""

    def __init__(self, start: int = 0):
        self.chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, data: bytes) -> int:
        at = self.chars
        self.chars += len(self._decoder.decode(data))
        return at


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float] | None], n: int,
                        bytes_of: Callable[[int], bytes], offsets: TextOffsets) -> CompletionLogprobs:
    """Legacy completions layout; `offsets` carries the choice's text position from piece to piece. An
    entry of None (an echoed prompt's first token, which nothing predicts) gives null logprobs."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=True):
        data = bytes_of(tid)
        out.tokens.append(token_string(data))
        out.token_logprobs.append(None if entry is None else entry.get(tid))
        out.top_logprobs.append(None if entry is None else
                                {token_string(bytes_of(t)): lp for t, lp in _top(entry, n)})
        out.text_offset.append(offsets.add(data))
    return out


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], n: int,
                  bytes_of: Callable[[int], bytes]) -> ChatLogprobs:
    """Chat layout: each token's `bytes` are its real bytes, so joining them rebuilds the content."""
    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        top = [TopLogprob(token=token_string(bytes_of(t)), logprob=lp, bytes=list(bytes_of(t)))
               for t, lp in _top(entry, n)]
        data = bytes_of(tid)
        content.append(TokenLogprob(token=token_string(data), logprob=entry.get(tid, -9999.0),
                                    bytes=list(data), top_logprobs=top))
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
