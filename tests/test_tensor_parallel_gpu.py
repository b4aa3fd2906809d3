"""Tensor parallelism over NCCL (2 GPUs): greedy tokens identical to one GPU, dense and sparse, on the
Triton kernels with and without CUDA graphs and on the torch kernels. Skipped with fewer than 2 GPUs.

Lead's command on a 2-GPU kind (NVLink multicast stays off, as the device documentation requires):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        python -m pytest -q tests/test_tensor_parallel_gpu.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from needle.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

NEW_TOKENS = 24
PROMPT_LENS = (700, 1000, 1300, 1600)  # the sparse budget is 256: page selection really picks
VARIANTS = {"torch": {"attention_backend": "torch"},
            "triton": {"attention_backend": "triton"},
            "triton-eager": {"attention_backend": "triton", "enforce_eager": True}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A random Llama whose greedy output changes from token to token (8 heads / 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.15, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-llama-tp")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def greedy(path: Path, size: int, attention: str, **kw) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(4096) for _ in range(n)] for n in PROMPT_LENS]
    llm = LLM(str(path), device="cuda", dtype="float32", attention=attention, sparse_token_budget=256,
              streaming_ratio=0.5, dense_layers=1, kv_cache_memory="1GiB", enable_prefix_caching=False,
              tensor_parallel_size=size, **kw)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        llm.engine.close()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_gpus_give_one_gpus_tokens(model_path, attention, variant):
    one = greedy(model_path, 1, attention, **VARIANTS[variant])
    assert greedy(model_path, 2, attention, **VARIANTS[variant]) == one
    assert all(len(set(tokens)) > NEW_TOKENS // 3 for tokens in one)  # the model discriminates
