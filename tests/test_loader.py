"""Model resolution: bundled default, dummy configs, and one clear error for what we cannot load."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from needle.attention.head_profile import resolve_profile
from needle.engine import LLM, SamplingParams
from needle.engine.loader import (
    BUNDLED_NAME,
    ModelLoadError,
    bundled_gguf,
    gguf_to_directory,
    load_config,
    resolve_model,
)


def test_dummy_llama_config_resolves_with_rope_scaling():
    path, name = resolve_model("llama-3.1-8b", "dummy")
    cfg = load_config(path, name)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.eos_token_ids == (128001, 128008, 128009)


def test_dummy_weights_generate_from_token_ids():
    llm = LLM("smollm2-135m", load_format="dummy", attention="dense", kv_cache_memory="64MiB")
    assert llm.tokenizer is None
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("bad", ["/nonexistent/model", "README.md"])
def test_unknown_paths_fail_in_one_line(bad):
    with pytest.raises(ModelLoadError) as e:
        resolve_model(bad, "auto")
    assert "\n" not in str(e.value)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    path, name = resolve_model(str(tmp_path), "auto")
    with pytest.raises(ValueError, match="Llama family"):
        load_config(path, name)


def test_corrupt_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        resolve_model(str(bad), "auto")


def test_the_bundled_profile_is_found_by_identity_whatever_the_file_is_called(tmp_path):
    """`--model path/to/the.gguf` names the model after its file; the shipped profile still fits it."""
    path, name = resolve_model(str(bundled_gguf()), "auto")
    assert name != BUNDLED_NAME
    cfg = load_config(path, name)
    profile = resolve_profile(None, name, cfg.identity, cfg.num_layers, cfg.num_kv_heads, None)
    assert profile.model == BUNDLED_NAME and profile.streaming_ratio == 0.5
    other = dataclasses.replace(cfg, num_layers=cfg.num_layers - 1)  # another shape: no profile fits
    assert resolve_profile(None, name, other.identity, other.num_layers, cfg.num_kv_heads,
                           None).streaming_ratio == 0.0


def test_gguf_cache_is_keyed_by_content_and_stored_in_the_gguf_dtypes(model_dir, tmp_path):
    """A copy of the same GGUF elsewhere (another clone, another venv) finds the same conversion; the
    quantised tensors are stored as bfloat16, the float ones (norms) as they were: half of fp32's size."""
    from safetensors import safe_open

    copy = tmp_path / "elsewhere" / bundled_gguf().name
    copy.parent.mkdir()
    shutil.copy(bundled_gguf(), copy)
    assert gguf_to_directory(copy) == model_dir
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "BF16"  # Q4_1 in the GGUF
    assert dtypes["model.embed_tokens.weight"] == "BF16"  # Q8_0
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"  # F32
    assert (model_dir / "model.safetensors").stat().st_size < 0.6 * 538_090_376  # the fp32 conversion


def hub_cache_with(root, repo: str, model_dir, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """A directory laid out as huggingface_hub's cache holding a tiny random Llama saved by transformers
    (with the bundled model's tokenizer): models--ORG--NAME/{refs/main, snapshots/<rev>/...}."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_repo_resolves_offline_from_a_hub_cache(tmp_path, model_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = hub_cache_with(tmp_path, "needle-test/tiny-llama", model_dir)
    path, name = resolve_model("needle-test/tiny-llama", "auto", download_dir=str(tmp_path))
    assert (path, name) == (snapshot, "needle-test/tiny-llama")
    assert resolve_model("needle-test/tiny-llama", "auto", revision=snapshot.name,
                         download_dir=str(tmp_path))[0] == snapshot
    llm = LLM("needle-test/tiny-llama", download_dir=str(tmp_path), attention="dense",
              kv_cache_memory="16MiB")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
    with pytest.raises(ModelLoadError, match="not in the cache") as e:  # offline, never downloaded
        resolve_model("needle-test/absent", "auto", download_dir=str(tmp_path))
    assert "\n" not in str(e.value)
