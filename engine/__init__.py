"""The engine: model loading and the model, the runner (one step's inputs -> logits, CUDA graphs), the
sampler, request validation and output assembly, the step loop (LLMEngine) and its front ends (LLM,
AsyncEngine), and `needle calibrate`. Imports scheduler/, attention/ and kvcache/, never server/."""

from needle.engine.async_engine import AsyncEngine, EngineFault
from needle.engine.config import EngineArgs
from needle.engine.llm import LLM
from needle.engine.llm_engine import LLMEngine
from needle.engine.outputs import CompletionOutput, RequestOutput
from needle.engine.validation import RequestError
from needle.scheduler.sampling_params import AttentionOverride, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineArgs", "EngineFault", "LLMEngine", "SamplingParams",
           "AttentionOverride", "RequestOutput", "CompletionOutput", "RequestError"]
