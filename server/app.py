"""The FastAPI application: routes, API-key check, body limit, and the engine's life cycle.

`build_app` takes everything as arguments (no module state), so tests can run several servers in
one process. Request bodies are read and validated here rather than by FastAPI, which keeps every
failure, including a body too large or not JSON, in OpenAI's error shape with status 400 or 413.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from needle.engine.config import EngineArgs
from needle.engine.stats import StepStats
from needle.server import needle_version
from needle.server.chat import create_chat_completion
from needle.server.completions import create_completion
from needle.server.errors import APIError, bad_request, from_validation_error, install_error_handlers
from needle.server.metrics import Metrics
from needle.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from needle.server.state import ServerConfig, ServerState
from needle.server.stats_log import StatsLog

logger = logging.getLogger("needle.server")
M = TypeVar("M", bound=BaseModel)
EngineFactory = Callable[[Callable[[StepStats], None]], Any]
OPEN_PATHS = ("/health", "/metrics")


def default_engine_factory(args: EngineArgs) -> EngineFactory:
    def build(listener: Callable[[StepStats], None]) -> Any:
        from needle.engine import AsyncEngine  # torch and the model load only when a server really starts

        return AsyncEngine(args, stats_listener=listener)

    return build


async def read_json(request: Request, model: type[M], config: ServerConfig,
                    metrics: Metrics | None = None) -> M:
    """Check the content type (415), read at most `max_request_bytes` (413 beyond) within
    `body_timeout` seconds (408), parse JSON (400 if not an object, nested too deeply, or holding a
    lone UTF-16 surrogate), validate with strict types (400)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise APIError(415, "the request body must be JSON: send 'Content-Type: application/json'")
    limit = config.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    try:
        body = await asyncio.wait_for(_read_body(request, limit), config.body_timeout)
    except asyncio.TimeoutError as err:
        raise APIError(408, f"the request body did not arrive within {config.body_timeout:g} s") from err
    except ClientDisconnect as err:  # nobody is left to answer: one line, one count
        logger.info("client disconnected while sending %s %s", request.method, request.url.path)
        if metrics is not None:
            metrics.upload_disconnects.inc()
        raise APIError(499, "client closed the request during upload") from err
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
        _check_strings(raw, body)
    except RecursionError as err:
        raise bad_request("the request body is nested too deeply") from err
    except UnicodeEncodeError as err:
        raise bad_request("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff) in a "
                          "string; strings must be valid Unicode") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        parsed = model.model_validate(raw)
    except ValidationError as err:
        raise from_validation_error(err) from err
    except RecursionError as err:
        raise bad_request("the request body is nested too deeply") from err
    if parsed.model_extra:
        logger.debug("ignoring unknown request fields: %s", sorted(parsed.model_extra))
    return parsed


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_strings(raw: Any, body: bytes) -> None:
    """JSON's \\uXXXX escapes can spell half a surrogate pair, which no tokenizer (nor UTF-8) takes;
    raw UTF-8 cannot, so only bodies with such an escape are re-encoded (UnicodeEncodeError if bad)."""
    if _SURROGATE_ESCAPE.search(body):
        json.dumps(raw, ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> None:
    """Python's json takes NaN and Infinity; JSON does not, and no sampling setting makes sense with them."""
    raise ValueError(f"{name} is not a JSON number")


# Bodies are read by read_json, not by FastAPI, so the OpenAPI document names them here (for clients
# and for schema fuzzing).
REQUEST_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def _openapi_with_bodies(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


def route_path(scope: dict) -> str:
    """The request path without --root-path (uvicorn puts the root path in front of it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class APIKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and route_path(scope) not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's own (up to 128 printable ASCII characters), or
    a new one. Plain ASGI, like APIKeyMiddleware, so streams pass through untouched."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given if 0 < len(given) <= 128 and _PRINTABLE.fullmatch(given) else uuid.uuid4().hex.encode()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


_PRINTABLE = re.compile(rb"[\x21-\x7e]+")


def build_app(config: ServerConfig, engine_args: EngineArgs, engine_factory: EngineFactory | None = None,
              on_load_failure: Callable[[], None] | None = None,
              on_engine_lost: Callable[[], None] | None = None) -> FastAPI:
    """`on_load_failure`: the engine did not load; `on_engine_lost`: it lost a tensor-parallel rank (called
    from the engine thread after every request has failed); the CLI exits non-zero on either."""
    state = ServerState(config=config, engine_args=engine_args)
    factory = engine_factory or default_engine_factory(engine_args)

    stats_log = StatsLog() if config.log_stats else None

    def on_step(stats: StepStats) -> None:
        if state.metrics is not None:
            state.metrics.on_step(stats)
        if stats_log is not None:
            stats_log.on_step(stats)

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(factory, on_step)
            engine.on_lost = on_engine_lost
            info = engine.describe()
            name = (config.served_model_names or (engine.model_name,))[0]
            state.metrics = Metrics(name, config.metrics_compat,
                                    {"block_size": info["page_size"], "num_gpu_blocks": info["num_pages"]},
                                    info["features"])
            engine.start()
        except Exception as err:
            state.load_error = f"{type(err).__name__}: {err}"
            logger.exception("the engine failed to load")
            if on_load_failure is not None:
                on_load_failure()
            return
        state.engine = engine
        logger.info("needle ready: model %s (served as %s), dtype %s, device %s, max model length %s, KV "
                    "capacity %s tokens in %s pages (%s sequences at full length), attention %s, head "
                    "profile %s, prefix caching %s; listening on %s", info.get("model"), state.model_name,
                    info.get("dtype"), info.get("device"), info.get("max_model_len"),
                    info.get("kv_capacity_tokens"), info.get("kv_cache_dtype"), info.get("max_concurrency"),
                    info.get("attention"),
                    info.get("head_profile"), "on" if info.get("prefix_caching") else "off", config.url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="needle", version=needle_version(), lifespan=lifespan)
    app.openapi = lambda: _openapi_with_bodies(app)
    app.state.needle = state
    install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestIdMiddleware)  # outermost but CORS: 401s carry the id too
    if config.allowed_origins:  # outermost: preflights are answered before the API-key check
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    started = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        state.ready()
        if state.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        return Response(status_code=200)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": needle_version()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        engine = state.ready()
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": started, "owned_by": "needle",
            "root": engine.model_name, "max_model_len": engine.max_model_len} for name in state.model_names]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request, CompletionRequest, config, state.metrics)
        return await create_completion(state, body, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request, ChatCompletionRequest, config, state.metrics)
        return await create_chat_completion(state, body, request.receive)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_json(request, TokenizeRequest, config, state.metrics)
        engine = state.ready()
        state.check_model(body.model)
        body.check()
        if body.messages is not None:
            tokens = state.chat_prompt_ids(body.messages, body.add_generation_prompt)
        else:
            tokens = state.encode(body.prompt or "", body.add_special_tokens is not False)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_json(request, DetokenizeRequest, config, state.metrics)
        state.ready()
        state.check_model(body.model)
        state.check_token_ids(body.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = state.metrics.exposition() if state.metrics is not None else b""
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

