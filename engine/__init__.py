"""needle's engine: model loading, the step loop, sampling, and the sync/async front ends."""

from engine.async_engine import AsyncEngine, EngineFault
from engine.config import EngineArgs
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import AttentionOverride, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineArgs", "EngineFault", "LLMEngine", "SamplingParams",
           "AttentionOverride", "RequestOutput", "CompletionOutput"]
