"""`needle serve` (the OpenAI-compatible server) and `needle calibrate` (head profiling).

Engine flags come from `EngineArgs.add_cli_args`, so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading

from needle.engine.config import EngineArgs, parse_bytes
from needle.server import needle_version
from needle.server.metrics import METRICS_COMPAT

_LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
LOST_RANK_GRACE_S = 2.0  # after a tensor-parallel rank dies: seconds of 503s before the process exits 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="needle", description="Long-context LLM inference server with sparse attention and an "
        "OpenAI-compatible HTTP API.")
    parser.add_argument("--version", action="version", version=f"needle {needle_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="Start the OpenAI-compatible HTTP server.",
        description="Start the OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
        "/v1/models, /tokenize, /detokenize, /health, /version, /metrics).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model_positional", nargs="?", metavar="MODEL",
                       help="Model to serve (same as --model).")
    serve.add_argument("--model", default=None, help="Model to serve: a Hugging Face model directory or a "
                       ".gguf file; omitted: the bundled SmolLM2-135M-Instruct.")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 for all interfaces).")
    server.add_argument("--port", type=int, default=8000, help="TCP port.")
    server.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on every endpoint but /health and "
                        "/metrics. Falls back to $NEEDLE_API_KEY; with neither, no key is required.")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="Model names clients may send (/v1/models lists each); the first is the one "
                        "responses and metrics report. Unset: the model's own name.")
    server.add_argument("--max-queued-seqs", "--max-queued-requests", dest="max_queued_seqs", type=int,
                        default=256, help="Sequences (prompts x n) beyond --max-num-seqs that may wait for a "
                        "batch slot; requests that would exceed it get 503 with Retry-After.")
    server.add_argument("--max-seqs-per-request", type=int, default=128,
                        help="Most sequences (prompts x n) one request may ask for; more get 400.")
    server.add_argument("--max-request-bytes", type=parse_bytes, default="16MiB",
                        help="Largest request body accepted, e.g. 16MiB; larger bodies get 413.")
    server.add_argument("--request-body-timeout", type=float, default=30.0,
                        help="Seconds a request body may take to arrive; slower uploads get 408.")
    server.add_argument("--allow-special-tokens-in-content", action="store_true",
                        help="Let chat message content spell the model's control tokens (e.g. "
                        "'<|im_end|>'), as before; by default content is encoded as plain text.")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="On SIGTERM/SIGINT: seconds the requests in flight get to finish (new ones "
                        "get 503) before the rest end with an error event; a second signal exits at once.")
    server.add_argument("--metrics-compat", default="none", choices=METRICS_COMPAT,
                        help="vllm: /metrics also serves vllm:num_requests_running, "
                        "vllm:num_requests_waiting, vllm:kv_cache_usage_perc (and "
                        "vllm:gpu_cache_usage_perc), vllm:prefix_cache_hits/queries (and "
                        "vllm:gpu_prefix_cache_hits/queries), vllm:cache_config_info and "
                        "vllm:lora_requests_info beside needle's names, for routers that read vLLM's (the "
                        "Gateway API Inference Extension's endpoint picker, llm-d, vLLM's production-stack "
                        "router).")
    server.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                        help="Jinja chat template (a file, or the template text itself) used instead of the "
                        "tokenizer's; one that renders `tools` enables tool_choice 'auto' (Hermes-style "
                        "<tool_call> blocks are read back).")
    server.add_argument("--disable-log-requests", action="store_true",
                        help="Do not log a line per request (by default: its id, prompt count and tokens, n, "
                        "max_tokens, temperature; never the prompt text).")
    server.add_argument("--disable-log-stats", action="store_true",
                        help="Do not log the throughput line (prompt and generation tokens/s, running and "
                        "waiting sequences, KV cache usage, prefix cache hit rate) every "
                        "$NEEDLE_LOG_STATS_INTERVAL seconds (default 10).")
    server.add_argument("--root-path", default="",
                        help="The path prefix a reverse proxy serves the API under (e.g. /needle), for "
                        "links and the OpenAPI document; the proxy strips it, as with vLLM's flag.")
    server.add_argument("--allowed-origins", type=parse_origins, default=(), metavar="ORIGINS",
                        help="CORS: origins browsers may call the API from, as a JSON list (vLLM's form: "
                        "'[\"https://app.example\"]') or comma-separated; '*' for any. Unset: no CORS "
                        "headers.")
    server.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM); with --ssl-certfile the "
                        "server speaks HTTPS only.")
    server.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM).")
    server.add_argument("--log-level", default="info", choices=_LOG_LEVELS, help="needle's log level.")
    server.add_argument("--uvicorn-log-level", default="warning", choices=_LOG_LEVELS,
                        help="uvicorn's log level (access logs appear at info).")
    EngineArgs.add_cli_args(serve.add_argument_group("engine"), skip=("model",))
    commands.add_parser("calibrate", add_help=False,
                        help="Profile attention heads into retrieval / streaming (see `needle calibrate "
                        "--help`).")
    return parser


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it is a Jinja template (as vLLM takes it)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise SystemExit(f"needle serve: --chat-template {value!r} is neither a file nor a Jinja template")


def parse_origins(value: str) -> tuple[str, ...]:
    """--allowed-origins: a JSON list of origins, or a comma-separated list."""
    if value.lstrip().startswith("["):
        try:
            origins = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not a JSON list: {err}") from None
        if not (isinstance(origins, list) and all(isinstance(o, str) for o in origins)):
            raise argparse.ArgumentTypeError("a JSON list of origin strings is expected")
        return tuple(origins)
    return tuple(o.strip() for o in value.split(",") if o.strip())


def check_tls(keyfile: str | None, certfile: str | None) -> bool:
    """Whether the server speaks HTTPS; both files or neither, and both readable."""
    if (keyfile is None) != (certfile is None):
        raise SystemExit("needle serve: --ssl-keyfile and --ssl-certfile go together: give both or neither")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"needle serve: {flag} {path}: no such file")
    return keyfile is not None


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains (ServerState.drain) before stopping, and the
        process then exits 0 (uvicorn would re-raise the signal); a second signal exits at once."""

        draining = False
        tasks: set = set()

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            log = logging.getLogger("needle.server")
            if not self.started:
                self.should_exit = True
            elif self.draining:
                log.warning("signal %d again: exiting now", sig)
                os._exit(1)
            else:
                self.draining = True
                log.info("signal %d: draining (up to %g s); send it again to exit at once", sig,
                         ns.shutdown_timeout)
                self.loop.call_soon_threadsafe(lambda: self.tasks.add(asyncio.ensure_future(self.drain())))

        async def drain(self) -> None:
            await app.state.needle.drain(ns.shutdown_timeout)
            self.should_exit = True

    from needle.server.app import build_app
    from needle.server.state import ServerConfig

    if ns.model_positional and ns.model and ns.model_positional != ns.model:
        raise SystemExit(f"needle serve: MODEL {ns.model_positional!r} and --model {ns.model!r} disagree")
    ns.model = ns.model or ns.model_positional
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(host=ns.host, port=ns.port, api_key=ns.api_key or os.environ.get("NEEDLE_API_KEY"),
                          served_model_names=tuple(ns.served_model_name or ()),
                          max_queued_seqs=ns.max_queued_seqs,
                          max_seqs_per_request=ns.max_seqs_per_request,
                          max_request_bytes=ns.max_request_bytes, body_timeout=ns.request_body_timeout,
                          special_tokens_in_content=ns.allow_special_tokens_in_content,
                          metrics_compat=ns.metrics_compat,
                          chat_template=read_chat_template(ns.chat_template),
                          log_requests=not ns.disable_log_requests, log_stats=not ns.disable_log_stats,
                          allowed_origins=ns.allowed_origins, tls=check_tls(ns.ssl_keyfile, ns.ssl_certfile))
    failed = []

    def on_load_failure() -> None:
        failed.append(True)
        server.should_exit = True

    def on_engine_lost() -> None:  # new requests get 503 for a moment, then the process exits 1
        failed.append(True)
        threading.Timer(LOST_RANK_GRACE_S, lambda: setattr(server, "should_exit", True)).start()

    try:
        engine_args = EngineArgs.from_cli_args(ns)
    except ValueError as err:  # a flag that cannot be honoured: one line, no traceback
        raise SystemExit(f"needle serve: {err}") from None
    app = build_app(config, engine_args, on_load_failure=on_load_failure, on_engine_lost=on_engine_lost)
    logging.getLogger("needle.server").info("loading the model; /health answers 503 until it is ready")
    server = DrainingServer(uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                                           timeout_graceful_shutdown=5, root_path=ns.root_path,
                                           ssl_keyfile=ns.ssl_keyfile, ssl_certfile=ns.ssl_certfile))
    server.run()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from needle.engine.calibrate import main as calibrate

        return calibrate(argv[1:]) or 0
    ns = build_parser().parse_args(argv)
    return serve(ns)


if __name__ == "__main__":
    sys.exit(main())
