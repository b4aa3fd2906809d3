"""The OpenAI-compatible HTTP server: FastAPI app and CLI, wire protocol, errors in OpenAI's shape, SSE,
Prometheus metrics. The top layer: imports engine/ (and the value types engine/ re-exports)."""
