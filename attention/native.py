"""The C++ kernels of the CPU paths (decode attention, quantised matmuls): each source is compiled once per
source text, flags and compiler into ~/.cache/needle and loaded with ctypes (seconds to build: no torch
headers). Where it cannot be built (no compiler, a CPU without AVX2/FMA/F16C) the loader returns None,
logged once, and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Named ISAs, not -march=native: the build must run on any AVX2 machine, and AVX-512 traps on some hosts.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


def sources(source: Path) -> list[str]:
    """The text of `source` and of every file it includes with quotes, recursively (an edit of any of
    them rebuilds it)."""
    text = source.read_text()
    return [text] + [part for name in re.findall(r'#include "([^"]+)"', text)
                     for part in sources(source.parent / name)]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "needle"


@functools.cache
def load(source: Path, fallback: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled `source` (with FLAGS and `flags`), built on first use; None where it cannot be (the
    warning says `fallback`: what the caller does instead)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        log.warning("no C++ compiler found: %s", fallback)
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    flags = (*FLAGS, *flags)
    key = hashlib.sha256("\n".join([*sources(source), *flags, version]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        log.info("building %s into %s (once per source and compiler)", source.name, target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, str(source), *flags, "-o", str(built)], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                log.warning("building %s failed, %s:\n%s", source, fallback, run.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent builders each install a whole file
    return ctypes.CDLL(str(target))
