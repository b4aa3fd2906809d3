"""A non-editable install is one package, `needle`, and carries its data: configs/ and head profiles."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, cwd=out)
    return next(out.glob("needle_serve-*.whl"))


def test_the_wheel_holds_one_package_with_its_data(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"needle"}
    for data in ("needle/configs/llama-3.1-8b.json", "needle/attention/profiles/SmolLM2-135M-Instruct.json"):
        assert data in names
    assert not any(n.startswith(("needle/tests/", "needle/bench/", "needle/deploy/")) for n in names)


def test_the_installed_package_finds_configs_and_profiles(wheel: Path, tmp_path: Path):
    """Installed away from the checkout, `--load-format dummy --model llama-3.1-8b` resolves its config
    and the bundled model's profile is found, both from inside the installed package."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    probe = (
        "import needle, needle.engine.loader as loader\n"
        "from needle.attention.head_profile import bundled_profile\n"
        "path, name = loader.resolve_model('llama-3.1-8b', 'dummy')\n"
        "cfg = loader.load_config(path, name)\n"
        f"assert needle.__file__.startswith({str(target)!r}), needle.__file__\n"
        f"assert str(path).startswith({str(target)!r}) and cfg.num_layers == 32\n"
        "ident = {'architecture': 'llama', 'num_layers': 30, 'hidden_size': 576, 'num_heads': 9,\n"
        "         'num_kv_heads': 3, 'head_dim': 64, 'vocab_size': 49152, 'name': None}\n"
        f"assert str(bundled_profile(ident)).startswith({str(target)!r})\n"
        "from needle import LLM, SamplingParams\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, env=env)
    run = subprocess.run([sys.executable, "-m", "needle.server.cli", "serve", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True)
    assert "--attention-backend" in run.stdout and "--enforce-eager" in run.stdout
