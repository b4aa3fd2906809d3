"""needle's engine: model loading, the step loop, sampling, and the sync/async front ends."""

from needle.engine.async_engine import AsyncEngine, EngineFault
from needle.engine.config import EngineArgs
from needle.engine.llm import LLM
from needle.engine.llm_engine import LLMEngine
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineArgs", "EngineFault", "LLMEngine", "SamplingParams",
           "AttentionOverride", "RequestOutput", "CompletionOutput"]
