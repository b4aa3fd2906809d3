"""Decode attention on the CPU that reads K/V pages in place (cpu_decode.cpp), instead of copying each
sequence's context into a contiguous batch first: at long context that copy costs as much as the read.

The C++ source is compiled on first use (attention/native.py) and called through ctypes. Without a
compiler, on a CPU without AVX2/FMA/F16C, or with NEEDLE_CPU_DECODE=0 in the environment,
`in_place_decode` says False and the callers keep their torch path (which stays the reference the tests
compare against).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from needle.attention import native
from needle.kvcache.pool import KVPool

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
CACHE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_GROUP = 8  # query heads per KV head the kernel is built for
MIN_CHUNK = 256  # positions: a (row, head) splits into chunks of at least this many for the threads


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (logged once) where it cannot be."""
    lib = native.load(SOURCE, "CPU decode attention copies the context (torch path)")
    if lib is None:
        return None
    lib.paged_decode.restype = None
    lib.paged_decode.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 7
                                 + [ctypes.c_int64] * 10 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int]
                                 + [ctypes.c_void_p] * 2)
    lib.summarise_slots.restype = None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.unit_positions.argtypes = [p, i, i, i, p, i, p, p, i, p, p, i, p, p, i, p, p]
    lib.unit_positions.restype = None
    lib.summarise_slots.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4
                                    + [ctypes.c_int64] * 4)
    lib.write_rows.argtypes = [p, ctypes.c_int, p, p, i, i]
    lib.write_rows.restype = None
    return lib


def in_place_decode(cache: torch.Tensor) -> bool:
    """The kernel serves this cache: on the CPU, in a dtype it reads, head_dim a multiple of 8, built
    (calls with more than MAX_GROUP query heads per KV head keep the torch path)."""
    return (cache.device.type == "cpu" and cache.dtype in CACHE_DTYPES and cache.shape[-1] % 8 == 0
            and os.environ.get("NEEDLE_CPU_DECODE", "1") != "0" and _library() is not None)


def write_kv(pool: KVPool, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             value_slot_mapping: torch.Tensor | None) -> None:
    """pool.write in one C++ call per tensor where the kernel serves the pages (float32 rows, int64 slots):
    a decode step's four small torch ops per layer cost a small model more than the copy itself."""
    keys, values = pool.k[layer], pool.v[layer]
    value_slots = slot_mapping if value_slot_mapping is None else value_slot_mapping
    lib = _library()
    if not (lib is not None and keys.device.type == values.device.type == "cpu"
            and keys.dtype == values.dtype and keys.dtype in CACHE_DTYPES
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in (k, v))
            and all(s.dtype == torch.int64 and s.is_contiguous() for s in (slot_mapping, value_slots))):
        pool.write(layer, k, v, slot_mapping, value_slot_mapping)
        return
    width, dtype = k[0].numel(), CACHE_DTYPES[keys.dtype]
    lib.write_rows(keys.data_ptr(), dtype, slot_mapping.data_ptr(), k.data_ptr(), k.shape[0], width)
    lib.write_rows(values.data_ptr(), dtype, value_slots.data_ptr(), v.data_ptr(), v.shape[0], width)


@dataclass
class PagedRows:
    """What each query row of a paged_decode call reads, in the dtypes the kernel takes. Dense decode
    builds it once per step and every layer reuses it; sparse decode lists its positions per call."""

    key_tables: torch.Tensor  # [R, P] int32: the page of each page_size positions
    value_tables: torch.Tensor  # [R, P] int32 (offloaded values lie elsewhere than their keys)
    span: int  # the most positions any row reads
    starts: torch.Tensor | None = None  # [R] int64, dense: row r reads starts[r] .. lengths[r] - 1
    lengths: torch.Tensor | None = None  # [R] int64
    positions: torch.Tensor | None = None  # [R, H, N] int64, sparse: the valid ones of these
    valid: torch.Tensor | None = None  # [R, H, N] bool

    @classmethod
    def dense(cls, key_tables: torch.Tensor, value_tables: torch.Tensor, lengths: torch.Tensor,
              starts: torch.Tensor | None = None) -> PagedRows:
        lengths = lengths.long().contiguous()
        return cls(*_tables(key_tables, value_tables), int(lengths.max()) if lengths.numel() else 0,
                   torch.zeros_like(lengths) if starts is None else starts.long().contiguous(), lengths)

    @classmethod
    def sparse(cls, key_tables: torch.Tensor, value_tables: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor) -> PagedRows:
        return cls(*_tables(key_tables, value_tables), positions.shape[-1],
                   positions=positions.long().contiguous(), valid=valid.contiguous())


def _tables(key_tables: torch.Tensor, value_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if value_tables.shape != key_tables.shape:
        raise ValueError("paged_decode needs one key and one value table per query row")
    keys = key_tables.int().contiguous()
    return keys, keys if value_tables is key_tables else value_tables.int().contiguous()


@functools.cache
def _heads(h: int) -> torch.Tensor:
    return torch.arange(h)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PagedRows, scale: float,
                 kv_heads: torch.Tensor | None = None,
                 with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [R, H, G, D] over one layer's caches [pages, page_size, Hkv, D], reading what `rows` says
    -> (output like q, log-sum-exp of the scores [R, H, G] float32, or None without `with_lse`).
    Query group h reads cache head kv_heads[h] (default h)."""
    lib = _library()
    r, h, g, d = q.shape
    if g > MAX_GROUP or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"paged_decode reads contiguous caches with at most {MAX_GROUP} query heads per "
                         f"KV head, got {g}")
    if rows.key_tables.shape[0] != r:
        raise ValueError(f"paged_decode needs one key and one value table per query row ({r})")
    pages, page_size, hkv, _ = k_cache.shape
    qf = q.float().contiguous()
    out = torch.empty(qf.shape)
    lse = torch.empty(r, h, g) if with_lse else None
    heads = _heads(h) if kv_heads is None else kv_heads.long().contiguous()
    threads = torch.get_num_threads()
    chunks = max(1, min(rows.span // MIN_CHUNK, -(-8 * threads // max(r * h, 1))))

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    lib.paged_decode(ptr(qf), ptr(k_cache), ptr(v_cache), CACHE_DTYPES[k_cache.dtype], ptr(rows.key_tables),
                     ptr(rows.value_tables), ptr(rows.starts), ptr(rows.lengths), ptr(rows.positions),
                     ptr(rows.valid), ptr(heads), r, h, g, d, hkv, rows.key_tables.shape[1], rows.span,
                     page_size, pages, v_cache.shape[0], scale, chunks, threads, ptr(out), ptr(lse))
    return out.to(q.dtype), lse


def summarises_in_place(k_cache: torch.Tensor, kmin: torch.Tensor) -> bool:
    """summarise_slots serves this layer: float32 summaries of float32 or 16-bit keys on the CPU, the
    kernel built."""
    return kmin.dtype == torch.float32 and in_place_decode(k_cache)


def summarise_slots(k_cache: torch.Tensor, summaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    slot_mapping: torch.Tensor, summary_tokens: int) -> None:
    """kvcache.summaries.summarise_pages in one call (same values): one layer's k_cache [pages,
    page_size, Hkv, D] and (kmin, kmax, kmean) [pages, page_size // summary_tokens, Hkv, D], contiguous."""
    if slot_mapping.numel() == 0:
        return
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    slots = slot_mapping.long().contiguous()
    kmin, kmax, kmean = summaries
    _library().summarise_slots(k_cache.data_ptr(), CACHE_DTYPES[k_cache.dtype], kmin.data_ptr(),
                               kmax.data_ptr(), kmean.data_ptr(), slots.data_ptr(), slots.numel(), hkv, d,
                               summary_tokens)


def unit_positions(chosen: torch.Tensor, allowed: torch.Tensor, within_k: torch.Tensor, ctx: torch.Tensor,
                   unit: int, sink: tuple[torch.Tensor, torch.Tensor],
                   recent: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode's positions [B, H, N] and valid flags in one call (cpu_decode.cpp says the rule;
    sparse.unit_positions_torch is its torch form): chosen [B, H, K] units, allowed [B, U],
    within_k [B, K], ctx [B], and the rows' sink and recent (positions, read) [B, S] / [B, R]."""
    b, h, k = chosen.shape
    (sink_pos, sink_ok), (recent_pos, recent_ok) = sink, recent
    n = sink_pos.shape[1] + k * unit + recent_pos.shape[1]
    pos, valid = torch.empty(b, h, n, dtype=torch.long), torch.empty(b, h, n, dtype=torch.bool)
    inputs = (chosen.long(), allowed, within_k, ctx.long(), sink_pos, sink_ok, recent_pos, recent_ok)
    held = [t.contiguous() for t in inputs]  # alive through the call
    units, allowed_p, within, ctx_p, sink_p, sink_v, recent_p, recent_v = (t.data_ptr() for t in held)
    _library().unit_positions(units, b, h, k, allowed_p, allowed.shape[1], within, ctx_p, unit, sink_p,
                              sink_v, sink_pos.shape[1], recent_p, recent_v, recent_pos.shape[1],
                              pos.data_ptr(), valid.data_ptr())
    return pos, valid
