"""`--quantization int4` against the same model's fp32 weights (the GGUF dequantised): stated bounds."""

from __future__ import annotations

import pytest
import torch

from bench.quantization import prompt_logprobs
from bench.texts import long_prompt
from needle.engine import LLM, SamplingParams, quantization
from needle.engine.quantization import Int4Linear, Int8Linear, quantize


@pytest.fixture(scope="module")
def int4_llm() -> LLM:
    return LLM(attention="dense", quantization="int4", kv_cache_memory="128MiB")


@pytest.mark.parametrize("path", ["prefill dequantises", "int4 kernel"])
def test_int4_keeps_the_answers_of_fp32(dense_llm: LLM, int4_llm: LLM, path: str, monkeypatch):
    """Both int4 paths over a 400-token prompt: the prefill's (Q4_1 blocks dequantised, fp32 matmul) and
    the decode steps' (int8 activations through q4_matmul, forced here for every row)."""
    if path == "int4 kernel":
        monkeypatch.setattr(quantization, "INT4_KERNEL_ROWS", 10**9)
    ids = long_prompt(dense_llm.tokenizer, 400, offset=7_000)
    ref, got = prompt_logprobs(dense_llm, ids), prompt_logprobs(int4_llm, ids)
    top = ref.argmax(-1, keepdim=True)
    delta = (ref.gather(1, top) - got.gather(1, top)).abs()
    assert (got.argmax(-1, keepdim=True) == top).float().mean() >= 0.95
    assert delta.mean() < 0.05 and delta.max() < 0.5


def test_int4_serves_through_llm(int4_llm: LLM):
    out = int4_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))[0]
    assert "Paris" in out.outputs[0].text
    assert isinstance(int4_llm.engine.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(int4_llm.engine.model.lm_head, Int8Linear)  # tied to the 8-bit embedding


@pytest.mark.parametrize("rows", [128, 8])
def test_int4_weights_reconstruct_a_q4_1_block_grid(rows: int):
    """Weights on a Q4_1 grid (scale * q + min, q in 0..15 per 32 inputs) come back within fp16 rounding of
    the scale and minimum, through the prefill's dequantised tiles (128 rows) and the int4 kernel (8 rows:
    one-hot rows are exact in int8); 60 output columns leave the last tile 4 columns of padding."""
    gen = torch.Generator().manual_seed(0)
    scale, low = torch.rand(60, 4, 1, generator=gen) + 0.1, torch.randn(60, 4, 1, generator=gen)
    q = torch.randint(0, 16, (60, 4, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # every block spans its whole grid, as a quantiser leaves it
    linear = torch.nn.Linear(128, 60, bias=False)
    linear.weight.data = (scale * q + low).view(60, 128)
    layer = Int4Linear(linear)
    deq = torch.cat([layer(eye) for eye in torch.eye(128).split(rows)]).T
    fp16_step = linear.weight.abs().max().item() / 512  # 15 * scale + min, each fp16-rounded
    torch.testing.assert_close(deq, linear.weight.data, rtol=0, atol=fp16_step)
    torch.testing.assert_close(deq, layer.dequantized_torch()[:60])  # the tests' torch reference


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 32])
def test_int4_kernel_matches_its_dequantised_weight(rows: int):
    """q4_matmul against x @ W.T with x rounded to int8 per 32 inputs as the kernel rounds it and W the
    weight its tiles stand for, on fresh random inputs: the same up to float summation order; rows
    cover the 4-row tiles, the 2- and 1-row tails and the largest decode call."""
    assert quantization._library() is not None  # this machine builds the kernel
    layer = Int4Linear(torch.nn.Linear(96, 200, bias=False))
    x = torch.randn(rows, 96)
    blocks = x.view(rows, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    ref = (torch.round(blocks / d) * d).view(rows, 96) @ layer.dequantized_torch().T
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_int8_kernel_matches_its_dequantised_weight(rows: int):
    """The Q8_0 kernel (activations rounded to int8 per 32 inputs) against x @ W.T of the weight its
    blocks stand for, on fresh random inputs; rows cover the 4-row tiles and the tail."""
    assert quantization._library() is not None  # this machine builds the kernel
    linear = torch.nn.Linear(96, 200, bias=False)
    head = Int8Linear(linear)
    x = torch.randn(rows, 96)
    ref = x @ head.dequantized().T
    got = head(x)
    assert got.shape == (rows, 200)
    assert ((got - ref).norm() / ref.norm()) < 0.01  # int8 activations: ~0.5% relative error
    torch.testing.assert_close(head.dequantized(), linear.weight.data, rtol=0,
                               atol=linear.weight.abs().max().item() / 127)


def test_int4_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="CPU"):
        quantize(torch.nn.Linear(32, 8), "int4", torch.device("meta"))


def test_fused_decode_layers_are_the_modules_bit_for_bit(int4_llm: LLM):
    """engine/cpu_layer.py's C++ decode step against the same layers run module by module: the same
    tokens and the same logprobs, for one sequence and for a batch (rows of several sequences)."""
    layers = int4_llm.engine.model.model.layers
    fused = [layer.fused for layer in layers]
    assert all(f is not None for f in fused)  # SmolLM2 in int4: every layer qualifies
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)

    def run(batch: list[str]) -> list:
        return [(o.outputs[0].token_ids, [sorted(p.items()) for p in o.outputs[0].logprobs])
                for o in int4_llm.generate(batch, params)]

    with_fused = run(prompts[:1]), run(prompts)
    for layer in layers:
        layer.fused = None
    try:
        assert (run(prompts[:1]), run(prompts)) == with_fused
    finally:
        for layer, f in zip(layers, fused, strict=True):
            layer.fused = f
