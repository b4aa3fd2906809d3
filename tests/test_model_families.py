"""Each supported family against transformers' own implementation, on small random-weight models.

Per family: build the model with transformers' class from a config (few layers, GQA, an explicit head_dim
where the family has one, a sliding window shorter than the prompts where it has one), save_pretrained it,
load it with needle (dense attention, prefix cache on, staggered batch, whole and chunked prefill), and
check greedy tokens identical and the top-20 log-probabilities of every generated position (the first is
the prompt's last position) within LOGPROB_TOLERANCE of transformers' (fp32).
"""

from __future__ import annotations

import random

import pytest
import torch
from support import run_staggered

from needle.engine import LLM, SamplingParams
from needle.engine.model_config import ModelConfig

NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4
WINDOW = 24
VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=None,
              bos_token_id=None, pad_token_id=0, initializer_range=0.2)


def family_config(family: str):
    """transformers' config of a small model of the family."""
    import transformers as tf

    if family == "qwen3":  # explicit head_dim (not hidden/heads), q/k norm, no window as released
        return tf.Qwen3Config(**COMMON, num_hidden_layers=3, head_dim=32, tie_word_embeddings=True)
    if family == "qwen2":  # qkv bias; the window on layers >= max_window_layers
        return tf.Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                              max_window_layers=1, tie_word_embeddings=False)
    if family == "mistral":  # every layer windowed
        return tf.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=WINDOW, head_dim=16)
    if family == "gemma3":  # local/global interleave with two RoPE bases, query_pre_attn_scalar, softcap
        return tf.Gemma3TextConfig(
            **COMMON, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=48, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            final_logit_softcapping=30.0, tie_word_embeddings=True)
    raise ValueError(family)


def make_prompts() -> list[list[int]]:
    """Prompts longer than the window, two sharing a 48-token prefix (three full pages for the cache)."""
    rng = random.Random(0)
    shared = [rng.randrange(1, VOCAB) for _ in range(48)]
    return [shared + [rng.randrange(1, VOCAB) for _ in range(30)],
            [rng.randrange(1, VOCAB) for _ in range(61)],
            shared + [rng.randrange(1, VOCAB) for _ in range(9)],
            [rng.randrange(1, VOCAB) for _ in range(100)]]


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return out.sequences[0, len(ids):].tolist(), [s[0].float().log_softmax(-1) for s in out.logits]


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "mistral", "gemma3"])
def family(request, tmp_path_factory):
    """(name, saved model directory, prompts, transformers' reference) built once per family."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(request.param), dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    prompts = make_prompts()
    with torch.inference_mode():
        reference = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return request.param, path, prompts, reference


@pytest.mark.parametrize("chunk", [4096, 32])
def test_greedy_and_logprobs_match_transformers(family, chunk):
    name, path, prompts, reference = family
    cfg = ModelConfig.from_file(path / "config.json", name)
    if name != "qwen3":
        assert cfg.windowed and all(len(p) > WINDOW for p in prompts)
    llm = LLM(str(path), attention="dense", kv_cache_memory="64MiB", max_num_batched_tokens=chunk,
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=20)
    got = run_staggered(llm.engine, prompts + prompts[:1], params)  # the repeat hits the prefix cache in full
    for i, (ref_tokens, ref_logprobs) in enumerate(reference + reference[:1]):
        tokens, logprobs = got[str(i)]
        assert tokens == ref_tokens, f"{name}: prompt {i} ({len(prompts[i % len(prompts)])} tokens) diverged"
        for step, (top, ref) in enumerate(zip(logprobs, ref_logprobs, strict=True)):
            err = max(abs(lp - ref[t].item()) for t, lp in top.items())
            assert err < LOGPROB_TOLERANCE, f"{name}: prompt {i} step {step}: logprob error {err:.2e}"


def test_sparse_mode_reads_windowed_layers_densely_over_their_window(family):
    """In sparse mode a windowed layer is one streaming head over its window: no sinks, no page selection.
    With a budget far below the prompts and no dense layers, an all-windowed model (Mistral) therefore
    still gives the dense output; the others run their global layers sparsely."""
    name, path, prompts, reference = family
    llm = LLM(str(path), attention="sparse", kv_cache_memory="64MiB", sparse_token_budget=48,
              sparse_unit_tokens=16, sink_tokens=16, local_tokens=16, prefill_local_tokens=16,
              retrieval_local_tokens=16, dense_layers=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    tokens = [o.outputs[0].token_ids for o in outs]
    if all(w is not None for w in llm.engine.model_config.layer_windows):
        assert tokens == [r[0] for r in reference]
    else:
        assert all(len(t) == NEW_TOKENS for t in tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_serve_the_family_on_cuda(family):
    """The Triton kernels (sliding windows included, CUDA graphs on) give transformers' greedy tokens
    densely, chunked prefill included, and in sparse mode the torch backend's tokens."""
    name, path, prompts, reference = family
    common = dict(device="cuda", dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=32)
    dense = LLM(str(path), attention="dense", attention_backend="triton", **common)
    got = run_staggered(dense.engine, prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    assert [got[str(i)][0] for i in range(len(prompts))] == [r[0] for r in reference], name
    sparse = dict(attention="sparse", sparse_token_budget=48, sparse_unit_tokens=16, sink_tokens=16,
                  local_tokens=16, prefill_local_tokens=16, retrieval_local_tokens=16, dense_layers=0,
                  **common)
    runs = [LLM(str(path), attention_backend=b, **sparse).generate(
        prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS)) for b in ("torch", "triton")]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]], name


def test_window_layout_from_configs():
    """Which layers are windowed, as transformers decides it per family."""
    layers = ModelConfig.from_dict({**_raw("qwen2"), "use_sliding_window": False}, "q").layer_windows
    assert layers == (None, None, None)
    assert ModelConfig.from_dict(_raw("qwen2"), "q").layer_windows == (None, WINDOW, WINDOW)
    assert ModelConfig.from_dict(_raw("mistral"), "m").layer_windows == (WINDOW, WINDOW)
    gemma = {k: v for k, v in _raw("gemma3").items() if k != "layer_types"}
    gemma = ModelConfig.from_dict({**gemma, "num_hidden_layers": 12, "sliding_window_pattern": 6}, "g")
    assert [w is None for w in gemma.layer_windows] == [(i + 1) % 6 == 0 for i in range(12)]
    assert (gemma.rope_theta, gemma.local_rope_theta) == (1e6, 1e4)


def _raw(family: str) -> dict:
    return family_config(family).to_dict()


class ByteTokenizer:
    """Enough of a tokenizer for calibration's passkey prompts on a model saved without one."""

    def encode(self, text: str) -> list[int]:
        return [1 + b % (VOCAB - 1) for b in text.encode()]


def test_calibrate_scores_global_layers_only(family, monkeypatch):
    """`needle calibrate` runs on the family; sliding-window layers (which never see a needle outside
    their window) are left out of the streaming split."""
    from needle.attention.head_profile import HeadProfile
    from needle.engine.calibrate import calibrate

    name, path, _, _ = family
    llm = LLM(str(path), attention="dense", kv_cache_memory="64MiB", enable_prefix_caching=False)
    monkeypatch.setattr(LLM, "tokenizer", property(lambda self: ByteTokenizer()))  # engine detokenises none
    scores = calibrate(llm, num_prompts=2, length=200, seed=0)
    local = [i for i, w in enumerate(llm.engine.model_config.layer_windows) if w is not None]
    assert scores.shape == (llm.engine.model_config.num_layers, 2)
    assert all(scores[i].sum() == 0 for i in local)
    assert all(scores[i].sum() > 0 for i in range(scores.shape[0]) if i not in local)
    profile = HeadProfile.from_scores(name, scores.tolist(), 0.5, local_layers=local)
    assert not any(profile.streaming[i][h] for i in local for h in range(2))
    assert profile.with_streaming_ratio(0.5).streaming == profile.streaming


def test_shipped_configs_of_the_new_families():
    """configs/ for --load-format dummy benchmarks: Qwen3-8B and Gemma-3-12B shapes parse as intended."""
    from needle.engine.loader import CONFIGS_DIR

    qwen = ModelConfig.from_file(CONFIGS_DIR / "qwen3-8b.json", "qwen3-8b")
    assert qwen.qk_norm and not qwen.windowed and qwen.head_dim == 128
    gemma = ModelConfig.from_file(CONFIGS_DIR / "gemma-3-12b.json", "gemma-3-12b")
    assert [i for i, w in enumerate(gemma.layer_windows) if w is None] == list(range(5, 48, 6))
    assert gemma.rope_scaling == {"rope_type": "linear", "factor": 8.0} and gemma.local_rope_theta == 1e4
