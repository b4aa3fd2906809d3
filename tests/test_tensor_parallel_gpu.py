"""Tensor parallelism over NCCL (2 GPUs): greedy tokens identical to one GPU, dense and sparse, on the
Triton kernels with and without CUDA graphs and on the torch kernels. Skipped with fewer than 2 GPUs.

Lead's command on a 2-GPU kind (NVLink multicast stays off, as the device documentation requires):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        python -m pytest -q tests/test_tensor_parallel_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from test_gpu_parity import NEW_TOKENS, VARIANTS, model_path, prompts  # noqa: F401 (fixtures)

from needle.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def greedy(path, batch: list[list[int]], size: int, attention: str, **kw) -> list[list[int]]:
    llm = LLM(str(path), device="cuda", dtype="float32", attention=attention, sparse_token_budget=256,
              streaming_ratio=0.5, dense_layers=1, kv_cache_memory="1GiB", enable_prefix_caching=False,
              tensor_parallel_size=size, **kw)
    try:
        outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        llm.engine.close()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_gpus_give_one_gpus_tokens(model_path, prompts, attention, variant):  # noqa: F811
    one = greedy(model_path, prompts, 1, attention, **VARIANTS[variant])
    assert greedy(model_path, prompts, 2, attention, **VARIANTS[variant]) == one
    assert all(len(set(tokens)) > NEW_TOKENS // 3 for tokens in one)  # the model discriminates
