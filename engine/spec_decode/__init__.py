"""Speculative decoding: drafters propose up to k tokens per decoding sequence, one multi-row step
verifies them losslessly, a goodput controller picks k each step.

    config.py      --speculative-config (vLLM's JSON)
    drafter.py     the drafter interface; ngram.py, self_sparse.py, draft_model.py: one drafter each
    verify.py      greedy and rejection-sampling verification, per position, every SamplingParams field
    controller.py  SmartSpec goodput: k from acceptance and a step-time model fitted online
    decoder.py     the step around the engine's: plan, propose, emit (verify + rollback), finish
"""

from __future__ import annotations

from needle.engine.spec_decode.config import SpeculativeConfig
from needle.engine.spec_decode.decoder import SpecDecoder, SpecStats, step_shape
from needle.engine.spec_decode.drafter import Draft, Drafter

__all__ = ["SpeculativeConfig", "SpecDecoder", "SpecStats", "Draft", "Drafter", "step_shape", "build_drafter"]


def build_drafter(config: SpeculativeConfig, engine) -> Drafter:
    """The configured drafter over the engine's model, pool and settings."""
    if config.method == "ngram":
        from needle.engine.spec_decode.ngram import NgramDrafter

        return NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "self_sparse":
        from needle.engine.cuda_graph import CudaGraphRunner
        from needle.engine.runner import ModelRunner
        from needle.engine.spec_decode.self_sparse import SelfSparseDrafter

        budget = config.draft_token_budget
        backend = engine.draft_backend(budget)
        graphs = None if engine.runner.graphs is None else CudaGraphRunner(
            engine.model, backend, engine.device, engine.args.max_num_seqs)
        return SelfSparseDrafter(ModelRunner(engine.model, backend, engine.args.page_size, engine.device,
                                             "sparse", budget, graphs), budget)
    from needle.engine.config import parse_bytes
    from needle.engine.spec_decode.draft_model import DraftModelDrafter

    return DraftModelDrafter(None if config.model == "bundled" else config.model, config.load_format,
                             engine.dtype, engine.device, engine.args.page_size,
                             parse_bytes(config.draft_kv_cache_memory), engine.vocab_size)
