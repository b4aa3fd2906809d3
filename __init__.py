"""needle: a long-context sparse-attention LLM inference server with an OpenAI-compatible API.

The repository root is the installed `needle` package (pyproject maps it), so the folders stay where the
design card puts them while importing as `needle.server`, `needle.engine`, ... Users write
`from needle import LLM, SamplingParams`, as they write `from vllm import LLM`.
"""

from needle.engine import LLM, AsyncEngine, EngineArgs, RequestOutput, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineArgs", "RequestOutput", "SamplingParams"]
