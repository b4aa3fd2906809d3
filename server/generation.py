"""One API request on the engine: one engine request per prompt, their outputs merged into one stream.

An API request may carry several prompts (completions' `prompt` list); each becomes engine request
`<id>-<k>` and its choices are numbered `k * n + i`. Whoever stops reading early (a client that went
away, an error) closes the stream, and every engine request that has not finished is aborted so its
KV pages go back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from needle.engine.async_engine import EngineStopped
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.engine.validation import ContextLengthError, RequestError
from needle.scheduler.sampling_params import SamplingParams
from needle.server.errors import APIError, bad_request
from needle.server.metrics import Metrics, RequestTimer
from needle.server.protocol import UsageInfo

T = TypeVar("T")


@dataclass
class ChoiceDelta:
    """What one choice gained in one engine step."""

    index: int  # the API choice index
    output: CompletionOutput  # text / token_ids / logprobs hold only the new part


@dataclass
class ChoiceResult:
    """A whole choice, for non-streaming responses."""

    pieces: list[str] = field(default_factory=list)  # joined once at the end: long outputs stay linear
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, out: CompletionOutput) -> None:
        self.pieces.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason or self.finish_reason
        self.stop_reason = out.stop_reason if out.stop_reason is not None else self.stop_reason


@dataclass(eq=False)  # hashed by identity: ServerState keeps the live ones in a set
class Generation:
    """Runs the engine requests of one API request and yields their choice deltas in arrival order."""

    engine: Any
    metrics: Metrics
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    background: set[asyncio.Task]  # keeps abort tasks alive after the request handler is gone
    release: Callable[[], None]  # gives back the admission slot; idempotent
    prompt_param: str = "prompt"  # the request field a context-length refusal names
    completion_tokens: int = 0
    arrival: float = 0.0
    prompt_logprobs: dict[int, list[dict[int, float] | None]] = field(default_factory=dict)  # by prompt
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _unfinished: set[str] = field(default_factory=set)
    _outputs: list[AsyncIterator[RequestOutput]] = field(default_factory=list)

    async def start(self) -> None:
        """Hand every prompt to the engine and wait until it has taken them all, so that a refusal (400)
        comes before a streamed response sends its headers; on a refusal the others are aborted."""
        self.arrival = time.monotonic()
        try:
            for k, prompt in enumerate(self.prompts):
                rid = f"{self.request_id}-{k}"
                self._outputs.append(await self.engine.add_request(prompt, self.params, rid,
                                                                   group=self.request_id))
                self._unfinished.add(rid)
        except BaseException as err:
            for outputs in self._outputs:
                await outputs.aclose()  # aborts the engine request
            self._unfinished.clear()
            self.release()
            if isinstance(err, Exception):
                raise _as_api_error(err, self.prompt_param) from err
            raise

    def cancel(self, err: APIError) -> None:
        """End the request with `err` (shutdown): the reader raises it next, which aborts the rest."""
        self._queue.put_nowait(err)

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        pumps = [asyncio.create_task(self._pump(k, outputs)) for k, outputs in enumerate(self._outputs)]
        live = len(pumps)
        try:
            while live:
                item = await self._queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise _as_api_error(item, self.prompt_param)
                else:
                    yield item
        finally:
            for pump in pumps:
                pump.cancel()
            for rid in self._unfinished:  # the reader left early: free the pages, count the aborts
                self._spawn(self.engine.abort(rid))
                self.metrics.request_success["abort"].inc(self.params.n)

    async def _pump(self, k: int, outputs: AsyncIterator[RequestOutput]) -> None:
        rid = f"{self.request_id}-{k}"
        timer = RequestTimer(self.metrics, self.arrival)
        generated, reasons = 0, []
        try:
            async for out in outputs:
                new_tokens = sum(len(c.token_ids) for c in out.outputs)
                if new_tokens:
                    timer.on_tokens()
                generated += new_tokens
                reasons += [c.finish_reason for c in out.outputs if c.finish_reason]
                if out.prompt_logprobs is not None:  # before the deltas that may read it
                    self.prompt_logprobs[k] = out.prompt_logprobs
                for choice in out.outputs:
                    self._queue.put_nowait(ChoiceDelta(k * self.params.n + choice.index, choice))
                if out.finished:
                    self._unfinished.discard(rid)
                    timer.on_finish(len(out.prompt_token_ids), generated, reasons, out.metrics)
        except Exception as err:  # handed to the reader, who turns it into one error response
            self._unfinished.discard(rid)  # refused or failed by the engine: nothing left to abort
            self._queue.put_nowait(err)
            return
        self.completion_tokens += generated
        self._queue.put_nowait(None)

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=prompt_tokens + self.completion_tokens)

    async def run(self, receive: Any) -> list[ChoiceResult]:
        """Non-streaming: run to the end unless the client leaves first, then free the slot."""
        try:
            return await until_disconnected(receive, self.collect())
        finally:
            self.release()

    async def collect(self) -> list[ChoiceResult]:
        """Run to the end; the choices in index order."""
        results = [ChoiceResult() for _ in range(len(self.prompts) * self.params.n)]
        async with contextlib.aclosing(self.deltas()) as deltas:
            async for delta in deltas:
                results[delta.index].add(delta.output)
        return results

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _as_api_error(err: BaseException, prompt_param: str) -> APIError:
    """The engine raises ValueError (a RequestError naming the field) for requests it refuses; anything
    else is an engine fault (500)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), param=prompt_param, code=err.code)
    if isinstance(err, RequestError):
        return APIError(400, str(err), param=err.param, code=err.code)
    if isinstance(err, ValueError):
        return bad_request(str(err))
    if isinstance(err, EngineStopped):
        return APIError(503, f"the engine has stopped: {err}")
    return APIError(500, f"the engine failed this request: {type(err).__name__}: {err}")


async def until_disconnected(receive: Any, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (non-streaming responses).

    Once the body is read, the next ASGI message is `http.disconnect`, so a waiter on `receive`
    wakes exactly when the client goes away.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            raise APIError(499, "client closed the request")
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
