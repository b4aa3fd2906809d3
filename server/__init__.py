"""The OpenAI-compatible HTTP server: FastAPI app and CLI, wire protocol, errors in OpenAI's shape, SSE,
Prometheus metrics. The top layer: imports engine/ (and the value types engine/ re-exports)."""

from importlib.metadata import PackageNotFoundError, version


def needle_version() -> str:
    try:
        return version("needle-serve")
    except PackageNotFoundError:
        return "0.1.0+source"
