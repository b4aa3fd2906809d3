"""On CUDA the Triton backend (with and without CUDA graphs) means what the torch backend means.

A random Llama saved by transformers (weights large enough that greedy output changes from token to
token), prompts several times longer than the sparse budget (so page selection really picks), greedy
tokens compared position by position, dense and sparse. With dummy weights every run emitted one token
repeated and any two backends agreed trivially; `test_the_model_is_discriminating` guards against that.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from needle.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 24
PROMPT_LENS = (700, 1000, 1300, 1600)  # the sparse budget is 256
VARIANTS = {"torch": {"attention_backend": "torch"},
            "triton": {"attention_backend": "triton"},
            "triton-eager": {"attention_backend": "triton", "enforce_eager": True}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.15, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(4096) for _ in range(n)] for n in PROMPT_LENS]


CAPTURED: dict[tuple[str, str], set[int]] = {}  # per run: the query lengths its CUDA graphs were captured for


def greedy(path: Path, prompts: list[list[int]], attention: str, name: str = "", **kw) -> list[list[int]]:
    llm = LLM(str(path), device="cuda", dtype="float32", attention=attention, sparse_token_budget=256,
              streaming_ratio=0.5, dense_layers=1, kv_cache_memory="1GiB", enable_prefix_caching=False,
              **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    graphs = llm.engine.runner.graphs
    CAPTURED[(attention, name)] = set() if graphs is None else {q for _, q, _, _ in graphs.graphs}
    return [o.outputs[0].token_ids for o in outs]


# Fixed K, so every step verifies 1 + 4 queries per sequence (the verify kernels and their graphs).
SPEC = '{"method": "self_sparse", "num_speculative_tokens": 4, "dynamic": false, "draft_token_budget": 128}'


@pytest.fixture(scope="module")
def runs(model_path, prompts) -> dict[tuple[str, str], list[list[int]]]:
    out = {(attention, name): greedy(model_path, prompts, attention, name, **kw)
           for attention in ("dense", "sparse") for name, kw in VARIANTS.items()}
    # Sparse speculation drafts only between reselections (every 16 positions here), so it must give
    # plain sparse decoding's tokens at that interval.
    out[("sparse", "torch-i16")] = greedy(model_path, prompts, "sparse", "torch-i16", selector_interval=16,
                                          **VARIANTS["torch"])
    for attention in ("dense", "sparse"):
        for name, kw in VARIANTS.items():
            out[(attention, name + "-spec")] = greedy(model_path, prompts, attention, name + "-spec",
                                                      speculative_config=SPEC, selector_interval=16, **kw)
        for name in ("torch", "triton"):
            out[(attention, name + "-fp8")] = greedy(model_path, prompts, attention, name + "-fp8",
                                                     kv_cache_dtype="fp8", **VARIANTS[name])
    # A 256-token prefill window: the prompts' chunks then prefill sparsely, not within the window.
    for density in (0.0, 0.3):
        for name in ("torch", "triton"):
            key = f"{name}-block-prefill-{density}"
            out[("sparse", key)] = greedy(model_path, prompts, "sparse", key, sparse_prefill_density=density,
                                          prefill_local_tokens=256, **VARIANTS[name])
    return out


def test_the_model_is_discriminating(runs):
    for tokens in runs[("dense", "torch")] + runs[("sparse", "torch")]:
        assert len(set(tokens)) > NEW_TOKENS // 3, tokens
    assert runs[("dense", "torch")] != runs[("sparse", "torch")]  # selection changes the answer


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("variant", ["triton", "triton-eager"])
def test_triton_equals_torch_position_by_position(runs, attention, variant):
    want, got = runs[(attention, "torch")], runs[(attention, variant)]
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        same = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        assert same == len(a), f"prompt {i} ({PROMPT_LENS[i]} tokens) diverges at new token {same}"


def test_triton_prefills_block_sparsely_as_torch_does(runs):
    for density in (0.0, 0.3):
        want = runs[("sparse", f"torch-block-prefill-{density}")]
        assert runs[("sparse", f"triton-block-prefill-{density}")] == want
    # the block-sparse prefill changed what the model saw
    assert runs[("sparse", "torch-block-prefill-0.3")] != runs[("sparse", "torch-block-prefill-0.0")]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_triton_reads_fp8_pages_as_torch_does(runs, attention):
    """Both backends store the same rounded bytes and compute in the model dtype over them."""
    assert runs[(attention, "triton-fp8")] == runs[(attention, "torch-fp8")]
    assert runs[(attention, "triton-fp8")] != runs[(attention, "triton")]  # the pages really are fp8


@pytest.mark.parametrize("variant", ["torch", "triton", "triton-eager"])
def test_dense_speculation_is_lossless_on_every_backend(runs, variant):
    """Verify steps (graphs, eager kernels, torch) emit exactly what plain dense decoding emits."""
    assert runs[("dense", variant + "-spec")] == runs[("dense", "torch")]


@pytest.mark.parametrize("variant", ["torch", "triton", "triton-eager"])
def test_sparse_speculation_is_plain_sparse_decoding_on_every_backend(runs, variant):
    """A sparse-mode verify (Triton kernels or torch) reads what plain sparse decode steps read."""
    assert runs[("sparse", variant + "-spec")] == runs[("sparse", "torch-i16")]


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_verify_steps_replay_cuda_graphs(runs, attention):
    """With K = 4 drafts every full verify step has 5 queries per sequence: a graph of that shape exists."""
    assert 5 in CAPTURED[(attention, "triton-spec")]
    assert CAPTURED[(attention, "triton-eager-spec")] == set()
