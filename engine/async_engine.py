"""The engine on its own thread, fed and drained by asyncio: what the HTTP server talks to.

The engine thread owns every engine object; the event loop only sends commands (add, abort) through
a thread-safe queue and receives outputs through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from needle.engine.config import EngineArgs
from needle.engine.distributed import RankLost
from needle.engine.llm_engine import LLMEngine
from needle.engine.outputs import RequestOutput
from needle.engine.stats import StepStats
from needle.scheduler.sampling_params import SamplingParams

log = logging.getLogger("needle.engine")
MAX_CONSECUTIVE_FAULTS = 3
ACCEPTED = object()  # first item of a request's stream: the engine took it


class EngineFault(RuntimeError):
    """The engine failed while this request was in flight (not the request's fault)."""


class EngineStopped(EngineFault):
    """The engine has stopped for good (too many consecutive faults); nothing more will be served."""


class RequestFault(RuntimeError):
    """This request's own computation went wrong (non-finite sampling); the rest of the batch is fine."""


class AsyncEngine:
    def __init__(self, args: EngineArgs, stats_listener: Callable[[StepStats], None] | None = None):
        self.engine = LLMEngine(args)
        self.stats_listener = stats_listener
        self.healthy = True
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.on_lost: Callable[[], None] | None = None  # called once when a tensor-parallel rank dies

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def sampling_defaults(self) -> dict:
        return self.engine.sampling_defaults

    def describe(self) -> dict:
        return self.engine.describe()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="needle-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.close()

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                          prompt_text: str | None = None, group: str | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """Queue a request and wait until the engine thread has validated it (its refusal is raised here,
        a RequestError, before any output); -> the iterator of its incremental outputs. Closing the
        iterator early (the client left) aborts the request. `group` names the API request it belongs
        to (the scheduler shares batch slots fairly between groups)."""
        if not self.healthy:
            raise EngineStopped("the engine has stopped; see the server log")
        ids = prompt if not isinstance(prompt, str) else await asyncio.to_thread(self.engine.encode_prompt,
                                                                                  prompt)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        if not self.healthy:  # stopped meanwhile: _fail_streams may have run before the stream existed
            self._streams.pop(request_id, None)
            raise EngineStopped("the engine has stopped; see the server log")
        self._commands.put(("add", request_id, ids, params, time.monotonic(),
                            prompt if isinstance(prompt, str) else prompt_text, group))
        try:
            first = await stream.get()
        except BaseException:  # cancelled while waiting: the engine may have taken it already
            self._streams.pop(request_id, None)
            self._commands.put(("abort", request_id))
            raise
        if isinstance(first, BaseException):
            self._streams.pop(request_id, None)
            raise first
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        """Step while there is work. A step that raises is a fault of the engine, not of one request
        (those end inside the step, with RequestFault): the requests in flight fail, waiting ones stay
        queued; after MAX_CONSECUTIVE_FAULTS the engine stops and every request still open fails."""
        faults = 0
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished())
            try:
                self.engine.check_ranks()  # the watchdog: a dead tensor-parallel rank, even while idle
                if not self.engine.has_unfinished():
                    continue
                outputs, stats = self.engine.step()
                faults = 0
            except RankLost as e:
                self._lose_rank(e)
                return
            except Exception as e:  # fail only the requests in flight, keep serving
                faults += 1
                log.exception("engine step failed (%d in a row)", faults)
                for rid in self.engine.fail_running():
                    self._deliver(rid, EngineFault(f"engine step failed: {type(e).__name__}: {e}"))
                if faults >= MAX_CONSECUTIVE_FAULTS:
                    self._stop_serving(f"engine stopped after {faults} consecutive faults")
                    return
                continue
            for out in outputs:
                self._deliver(out.request_id, out if out.error is None else RequestFault(out.error))
            if self.stats_listener is not None:
                self.stats_listener(stats)

    def _lose_rank(self, err: RankLost) -> None:
        """A tensor-parallel rank is gone: nothing can be computed any more. Every request fails as
        stopped (503), then `on_lost` (the server exits non-zero)."""
        log.error("tensor parallelism lost a rank: %s", err)
        for rid in self.engine.fail_running():
            self._deliver(rid, EngineStopped(str(err)))
        self._stop_serving(f"engine stopped: {err}")
        if self.on_lost is not None:
            self.on_lost()

    def _stop_serving(self, reason: str) -> None:
        """Mark the engine stopped, then fail every request it still holds and every stream still open
        (waiting requests, and adds not yet seen): none is left hanging."""
        self.healthy = False
        log.error("%s", reason)
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        self.engine.requests.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_streams)

    def _fail_streams(self) -> None:  # on the event loop
        for rid, stream in list(self._streams.items()):
            stream.put_nowait(EngineStopped(f"the engine stopped before request {rid} finished"))

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, arrival, text, group = cmd
            if rid not in self._streams:
                return  # the client left before the engine saw the request
            try:
                self.engine.add_request(rid, ids, params, arrival, prompt_text=text, group=group)
            except ValueError as e:
                self._deliver(rid, e)
                return
            self._deliver(rid, ACCEPTED)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])
            for out in self.engine.collect_outputs():
                self._deliver(out.request_id, out)
            if self.stats_listener is not None:
                self.stats_listener(self.engine.gauges())

    def _deliver(self, request_id: str, item: RequestOutput | BaseException | object) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)
