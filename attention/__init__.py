"""Attention backends over the paged KV cache: the contract (base.py), dense and sparse attention in plain
torch (the CPU path and the reference), their Triton versions for CUDA, selection policies and head
profiles. Imports kvcache/ only.

`build_backend` is the one place a backend class is chosen.
"""

from __future__ import annotations

from needle.attention.base import AttentionBackend
from needle.attention.head_profile import HeadProfile
from needle.attention.sparse import SparseConfig
from needle.kvcache.pool import KVPool


def build_backend(pool: KVPool, mode: str, kernels: str, sparse: SparseConfig, profile: HeadProfile | None,
                  num_q_heads: int, num_kv_heads: int, offload: bool = False) -> AttentionBackend:
    """mode: dense | sparse (the engine's --attention); kernels: torch | triton (resolved, not auto);
    offload: values live in kvcache/value_tiers.py (sparse)."""
    if kernels == "triton":
        from needle.attention.triton_backend import TritonDenseBackend, TritonSparseBackend

        dense_cls, sparse_cls = TritonDenseBackend, TritonSparseBackend
        if offload:
            from needle.attention.offload import TritonOffloadSparseBackend

            sparse_cls = TritonOffloadSparseBackend
    else:
        from needle.attention.dense import DenseBackend
        from needle.attention.sparse import SparseBackend

        dense_cls, sparse_cls = DenseBackend, SparseBackend
        if offload:
            from needle.attention.offload import OffloadSparseBackend

            sparse_cls = OffloadSparseBackend
    if mode == "dense":
        return dense_cls(pool)
    if profile is None:
        raise ValueError("sparse attention needs a head profile")
    return sparse_cls(pool, sparse, profile, num_q_heads, num_kv_heads)
