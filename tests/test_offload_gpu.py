"""Value offload on CUDA: the same greedy tokens as sparse attention without offload on the Triton path
(and the torch path), with a pinned host tier and every copy on the tiers' own stream.

The random Llama of test_gpu_parity.py (weights large enough that greedy output changes from token to
token), prompts several times the sparse budget, so page selection really picks and pages really move.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_gpu_parity import NEW_TOKENS, model_path  # noqa: F401  (the shared random-Llama fixture)

from needle.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT_LENS = (900, 1400, 2100)  # the sparse budget is 256


def engine(path, **kw) -> LLM:
    return LLM(str(path), device="cuda", dtype="float32", attention="sparse", sparse_token_budget=256,
               streaming_ratio=0.5, dense_layers=1, kv_cache_memory="1GiB", max_num_seqs=4,
               max_model_len=4096, **kw)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(4096) for _ in range(600)]
    return [[rng.randrange(4096) for _ in range(n)] for n in PROMPT_LENS] + [shared + [1, 2, 3], shared + [4]]


@pytest.fixture(scope="module")
def offloaded(model_path, prompts):  # noqa: F811
    llm = engine(model_path, cpu_kv_cache_memory="256MiB")
    tokens = greedy(llm, prompts)
    return llm, tokens


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_offload_equals_sparse_without_offload(model_path, prompts, offloaded, backend):  # noqa: F811
    """The default (Triton kernels over value tables) and the torch path, both offloaded, against sparse
    without offload on either backend."""
    assert offloaded[0].engine.backend.name == "triton-sparse-offload"
    torch_offloaded = greedy(engine(model_path, cpu_kv_cache_memory="256MiB", attention_backend="torch"),
                             prompts)
    want = greedy(engine(model_path, attention_backend=backend), prompts)
    for got in (offloaded[1], torch_offloaded):
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            same = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            assert same == len(a), f"prompt {i} diverges at new token {same} with offload"


def test_copies_run_on_their_own_stream_from_pinned_memory(offloaded):
    tiers = offloaded[0].engine.tiers
    assert tiers.host.is_pinned() and tiers.staging.is_pinned()
    assert tiers.stream is not None and tiers.stream != torch.cuda.current_stream()
    assert tiers.pool.v[tiers.first_layer].shape[0] < tiers.pool.num_pages, "device value slots are fewer"
    assert tiers.host_of, "finished sequences leave their prefix-cached pages on the host"
    page = next(iter(tiers.host_of))
    # a layer whose retrieval heads have a value cache (a layer of streaming heads only has none)
    i = next(i for i, n in enumerate(tiers.sizes.cache_slots) if n > 0)
    layer = tiers.first_layer + i
    slot = tiers.fetch(layer, [page])[0]  # copied on the tiers' stream, waited for here
    host = tiers.host[tiers.host_of[page], i].to("cuda")
    assert torch.equal(tiers.pool.v[layer][slot], host)
