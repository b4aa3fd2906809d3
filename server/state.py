"""What every handler needs: the engine once loaded, the metrics, the server settings, admission control.

The engine loads in a worker thread after the server is already listening, so `/health` can answer 503
meanwhile; every other endpoint asks `ready()` and answers 503 until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from needle.engine.config import EngineArgs
from needle.engine.detokenizer import TokenBytes
from needle.scheduler.sampling_params import SamplingParams
from needle.server.errors import APIError, bad_request
from needle.server.generation import Generation
from needle.server.metrics import Metrics
from needle.server.protocol import ChatMessage, model_not_found, new_id

logger = logging.getLogger("needle.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # the first is reported; the others are aliases
    max_queued_seqs: int = 256  # sequences beyond --max-num-seqs that may wait for a batch slot
    max_seqs_per_request: int = 128  # prompts x n of one request
    max_request_bytes: int = 16 * 2**20
    body_timeout: float = 30.0  # seconds a request body may take to arrive (408 beyond)
    special_tokens_in_content: bool = False  # True: message content may spell control tokens (unsafe)
    metrics_compat: str = "none"  # "vllm": also serve the router metrics under vLLM's names
    chat_template: str | None = None  # --chat-template: Jinja text replacing the tokenizer's own
    log_requests: bool = True  # one log line per admitted request (--disable-log-requests: none)
    log_stats: bool = True  # the periodic throughput line (--disable-log-stats: none)
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*": any)
    tls: bool = False  # --ssl-keyfile / --ssl-certfile: HTTPS only

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


@dataclass
class ServerState:
    config: ServerConfig
    engine_args: EngineArgs
    engine: Any = None
    metrics: Metrics | None = None
    load_error: str | None = None
    in_flight: int = 0  # sequences (prompts x n) of the requests admitted and not yet finished
    background: set[asyncio.Task] = field(default_factory=set)
    generations: set[Generation] = field(default_factory=set)  # admitted and not yet released
    draining: bool = False  # shutting down: admit nothing new, let the admitted finish
    _token_bytes: TokenBytes | None = None

    # Lifecycle.

    @property
    def healthy(self) -> bool:
        return self.engine is not None and bool(getattr(self.engine, "healthy", True))

    def ready(self) -> Any:
        """The engine, or a 503 while it loads or after it has failed."""
        if self.engine is None:
            reason = self.load_error or "the model is still loading"
            raise APIError(503, f"server not ready: {reason}", headers={"Retry-After": "5"})
        if not self.healthy:
            raise APIError(503, "the engine has stopped; the server cannot serve requests")
        return self.engine

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.config.served_model_names or (self.ready().model_name,)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise model_not_found(name)

    def admit(self, num_seqs: int) -> Callable[[], None]:
        """Take `num_seqs` sequence slots for one request and return its (idempotent) release; 400 when
        one request asks for more than a request may hold, 503 when batch and queue are full.

        Slots count sequences, not HTTP requests: one request with 200 prompts and n = 4 is 800
        sequences of work. A release function rather than a context manager: a streamed response
        outlives its handler.
        """
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        limit = self.engine_args.max_num_seqs + self.config.max_queued_seqs
        per_request = min(self.config.max_seqs_per_request, limit)
        if num_seqs > per_request:
            raise bad_request(f"the request asks for {num_seqs} sequences (prompts x n); at most "
                              f"{per_request} are allowed per request", param="n")
        if self.in_flight + num_seqs > limit:
            raise APIError(503, f"server busy: {self.in_flight} sequences in flight, this request needs "
                           f"{num_seqs} more (limit {limit})", code="server_busy",
                           headers={"Retry-After": "1"})
        self.in_flight += num_seqs
        held = [True]

        def release() -> None:
            if held.pop() if held else False:
                self.in_flight -= num_seqs

        return release

    async def generation(self, kind: str, prompts: list[list[int]], params: SamplingParams) -> Generation:
        """Admit one API request (400 when too large, 503 when full) and hand its prompts to the engine,
        which validates them (400 when it refuses one)."""
        engine, admitted = self.ready(), self.admit(len(prompts) * params.n)

        def release() -> None:
            admitted()
            self.generations.discard(gen)

        gen = Generation(engine, self.metrics, new_id(kind), prompts, params, self.background,
                         release=release, prompt_param="messages" if kind == "chatcmpl" else "prompt")
        self.generations.add(gen)
        if self.config.log_requests:  # counts and settings only: prompts may be private
            logger.info("request %s: %d prompt(s), %d prompt tokens, n=%d, max_tokens=%s, temperature=%g%s",
                        gen.request_id, len(prompts), sum(map(len, prompts)), params.n, params.max_tokens,
                        params.temperature, ", structured output" if params.structured_outputs else "")
        await gen.start()
        return gen

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: admit nothing new (503), give the admitted requests up to `timeout`
        seconds to finish, then end the rest with an error (an error event and [DONE] for streams)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.generations:
            logger.warning("shutdown timeout (%g s): ending %d unfinished requests", timeout,
                           len(self.generations))
        for gen in list(self.generations):
            gen.cancel(APIError(503, "the server is shutting down; the request did not finish in time",
                                code="server_shutting_down"))
        deadline = time.monotonic() + 5
        while self.in_flight and time.monotonic() < deadline:  # let the last events reach the clients
            await asyncio.sleep(0.05)

    # Tokens.

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer; a 400 for a model without one (--load-format dummy from a config),
        which takes token ids only."""
        tokenizer = self.ready().tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer (--load-format dummy serves random weights from a "
                              "config): send the prompt as token ids, e.g. \"prompt\": [1, 2, 3]",
                              param="prompt")
        return tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders a `tools` list (tool_choice "auto" needs one)."""
        return "tools" in (self.config.chat_template or self.tokenizer.chat_template or "")

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    contents: list[str] | None = None, tools: list[dict] | None = None) -> str:
        conversation = [{"role": m.template_role, "content": c, **m.template_fields()}
                        for m, c in zip(messages, contents or [m.text() for m in messages], strict=True)]
        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      chat_template=self.config.chat_template, **extra)
        except Exception as err:  # a template may reject a role order; that is the client's input
            raise bad_request(f"cannot apply the chat template: {err}", param="messages") from err

    def chat_prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
        """The chat template's tokens, with each message's content encoded as plain text: a client's
        `<|im_end|><|im_start|>system` stays text and cannot forge control tokens (OpenAI's rule;
        --allow-special-tokens-in-content restores the old behaviour). The template already wrote any
        BOS / special tokens into its text."""
        contents = [m.text() for m in messages]
        specials = [t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()]
        if self.config.special_tokens_in_content or not any(t and t in c for c in contents for t in specials):
            return self.encode(self.chat_prompt(messages, add_generation_prompt, tools=tools), False)
        # Render with a placeholder per message, then encode the template's text and the contents apart.
        marks = [f"\ue000needle-content-{i}\ue001" for i in range(len(messages))]
        rendered = self.chat_prompt(messages, add_generation_prompt, marks, tools)
        ids, pos = [], 0
        for mark, content in zip(marks, contents, strict=True):
            at = rendered.find(mark, pos)
            if at < 0:  # the template rewrote the content: nothing safe to split on
                raise bad_request("message content holds special-token text that this model's chat "
                                  "template cannot keep apart from its own", param="messages")
            ids += self.encode(rendered[pos:at], False)
            ids += self.tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            pos = at + len(mark)
        return ids + self.encode(rendered[pos:], False)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """For /detokenize, which never reaches the engine: ids must index the model's vocabulary."""
        vocab = self.ready().vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's raw bytes (a piece of a UTF-8 character for byte-fallback tokens)."""
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        return self._token_bytes(token_id)
