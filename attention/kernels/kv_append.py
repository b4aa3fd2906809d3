"""KV append: store a step's keys/values into their page slots and keep the key summaries exact.

One program per new token stores all its KV heads. The token that ends its run inside a summary
(the next token is not the next row of the same summary) owns that page's summary: it folds the keys
of the run (read from the step's input, never from the cache other programs are writing) and, unless the
run starts at the page's row 0, the summary already stored (the mean weighted by the rows it covers).
A run that starts at row 0 resets the summary, so a reused page never keeps a stale min/max/mean.
Slots < 0 (padded batch rows of a CUDA graph) are skipped.
Reference: reference.kv_append_ref.
"""

from __future__ import annotations

import torch

from needle.attention.kernels import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _as_page(x, cache_ptr, BOUND: tl.constexpr):
        """x in the cache's dtype, saturated at +-BOUND first where BOUND > 0 (fp8: see to_page_dtype)."""
        if BOUND > 0:
            x = tl.clamp(x.to(tl.float32), -BOUND, BOUND)
        return x.to(cache_ptr.dtype.element_ty)

    @triton.jit
    def _kv_append_kernel(k_ptr, v_ptr, slot_ptr, vslot_ptr, kc_ptr, vc_ptr, kmin_ptr, kmax_ptr, kmean_ptr,
                          T, k_stride, v_stride,
                          HKV: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, SB: tl.constexpr,
                          SUMMARIES: tl.constexpr, BOUND: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, HP)[:, None]
            d = tl.arange(0, D)[None, :]
            m = h < HKV
            src = h * D + d
            kt = _as_page(tl.load(k_ptr + t.to(tl.int64) * k_stride + src, mask=m), kc_ptr, BOUND)
            vt = _as_page(tl.load(v_ptr + t.to(tl.int64) * v_stride + src, mask=m), vc_ptr, BOUND)
            tl.store(kc_ptr + slot * HKV * D + src, kt, mask=m)
            vslot = tl.load(vslot_ptr + t).to(tl.int64)  # the value slot (offload), else slot itself
            tl.store(vc_ptr + vslot * HKV * D + src, vt, mask=m)
            if SUMMARIES:
                r = slot % SB
                nxt = tl.load(slot_ptr + t + 1, mask=t + 1 < T, other=-1).to(tl.int64)
                owner = (nxt != slot + 1) | (r == SB - 1)
                if owner:
                    kf = kt.to(tl.float32)
                    lo = kf
                    hi = kf
                    total = kf
                    run = r * 0 + 1
                    for i in tl.static_range(1, SB):
                        prev = tl.load(slot_ptr + t - i, mask=t - i >= 0, other=-1).to(tl.int64)
                        ok = (i <= r) & (run == i) & (prev == slot - i)
                        kp = _as_page(tl.load(k_ptr + (t - i).to(tl.int64) * k_stride + src, mask=m & ok,
                                              other=0.0), kc_ptr, BOUND).to(tl.float32)
                        lo = tl.where(ok, tl.minimum(lo, kp), lo)
                        hi = tl.where(ok, tl.maximum(hi, kp), hi)
                        total = tl.where(ok, total + kp, total)
                        run = tl.where(ok, run + 1, run)
                    blk = slot // SB
                    if run <= r:  # the page's earlier rows were written by earlier steps
                        lo = tl.minimum(lo, tl.load(kmin_ptr + blk * HKV * D + src, mask=m).to(tl.float32))
                        hi = tl.maximum(hi, tl.load(kmax_ptr + blk * HKV * D + src, mask=m).to(tl.float32))
                        old = tl.load(kmean_ptr + blk * HKV * D + src, mask=m).to(tl.float32)
                        total += old * (r + 1 - run).to(tl.float32)
                    tl.store(kmin_ptr + blk * HKV * D + src, lo.to(kmin_ptr.dtype.element_ty), mask=m)
                    tl.store(kmax_ptr + blk * HKV * D + src, hi.to(kmax_ptr.dtype.element_ty), mask=m)
                    mean = total / (r + 1).to(tl.float32)
                    tl.store(kmean_ptr + blk * HKV * D + src, mean.to(kmean_ptr.dtype.element_ty), mask=m)


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, Hkv, D] as the kernel reads it: each token's heads packed, tokens at any stride (v is a view
    into the qkv projection's output; copying it was one more launch per layer)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: tuple[torch.Tensor, ...] | None,
              k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, summary_tokens: int,
              value_slot_mapping: torch.Tensor | None = None) -> None:
    """One layer: k_cache/v_cache [pages, page_size, Hkv, D]; summaries (kmin, kmax, kmean), each
    [pages, page_size // sb, Hkv, D], or None; k, v [T, Hkv, D]; slot_mapping [T] (consecutive positions
    of a sequence in consecutive rows); value_slot_mapping [T]: where the values go when that is not
    their keys' slot (offload)."""
    t, hkv, d = k.shape
    if t == 0:
        return
    k, v = _packed_rows(k), _packed_rows(v)  # cast into the pages' dtype in the kernel
    fp8 = k_cache.element_size() == 1
    kmin, kmax, kmean = summaries or (k_cache, k_cache, k_cache)
    _kv_append_kernel[(t,)](
        k, v, slot_mapping, slot_mapping if value_slot_mapping is None else value_slot_mapping,
        k_cache, v_cache, kmin, kmax, kmean,
        t, k.stride(0), v.stride(0), HKV=hkv, HP=triton.next_power_of_2(hkv), D=d, SB=summary_tokens,
        SUMMARIES=summaries is not None,
        BOUND=torch.finfo(k_cache.dtype).max if fp8 else 0.0,
        num_warps=4 if hkv * d >= 512 else 1)
