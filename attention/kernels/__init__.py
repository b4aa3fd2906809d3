"""Triton kernels for the CUDA path, each beside a plain-torch reference (reference.py).

Modules here import on machines without Triton: `HAS_TRITON` says whether the kernels exist, and the
wrappers are only called by the CUDA backend.
"""

from __future__ import annotations

import torch

try:  # the CPU venv has no Triton; the kernels are simply absent there
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in fp32 ("ieee"), as torch does; Triton's default for them is TF32, whose
    1e-3 errors flip greedy tokens against the torch path. 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
