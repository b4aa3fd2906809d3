"""Paged decode attention, split over the context (flash-decoding), dense or sparse, in one kernel.

A program owns one (sequence, row, split). A row is the set of query heads that read the same tokens:
a whole GQA group for dense attention, streaming heads and group-shared selections (each KV page is then
loaded once for all G query heads, scored with one tensor-core dot), or a single query head when every
query head picks its own units. A verifying sequence (speculative decoding) brings several queries, its
newest token and its drafts at consecutive positions: the program holds all of them beside the row's
heads, so each KV page is loaded once for the whole verify, and each query reads what a decode step at
its own position would (causal among the queries, its own fixed ranges).
The tokens a row reads are a list of `unit_tokens`-token units:
    fixed units  - the sink [0, sink) and the recent tokens [ctx - recent, ctx) (dense: all of them), or,
                   with recent_units, the newest recent_units units;
    chosen units - retrieval rows only: units[b, row, :], -1 padded, tokens outside the fixed ranges.
Streaming KV heads use (stream_sink, stream_local) as their fixed ranges and choose nothing. Splits
divide a row's unit list evenly; a second kernel merges the splits by their log-sum-exp. Shapes depend
only on the batch size and the page-table width, so both kernels can be captured in a CUDA graph.
Reference: reference.paged_decode_ref.
"""

from __future__ import annotations

import functools
import math

import torch

from needle.attention.kernels import HAS_TRITON, dot_precision, tl, triton

if HAS_TRITON:

    @triton.jit
    def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, vt_ptr, ctx_ptr, qs_ptr, units_ptr, stream_ptr,
                             o_ptr, lse_ptr, qk_scale, bt_stride, vt_stride, u_stride_b, u_stride_r, k_sel,
                             sink, recent, recent_units, stream_sink, stream_local, window,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                             QPR: tl.constexpr, NQ: tl.constexpr, GP: tl.constexpr, UT: tl.constexpr,
                             S: tl.constexpr, SPARSE: tl.constexpr, VT: tl.constexpr,
                             PRECISION: tl.constexpr):
        b = tl.program_id(0)
        row = tl.program_id(1)
        split = tl.program_id(2)
        kvh = row * QPR // (HQ // HKV)
        ctx = tl.load(ctx_ptr + b).to(tl.int32)
        if NQ == 1:
            q0 = b
            nq = 1
        else:  # query j of nq sits at position ctx - nq + j (the last one is the newest)
            q0 = tl.load(qs_ptr + b).to(tl.int32)
            nq = tl.load(qs_ptr + b + 1).to(tl.int32) - q0
        r = tl.arange(0, GP)
        j = r // QPR
        heads = row * QPR + r % QPR
        live = (r < QPR * NQ) & (j < nq)
        qctx = ctx - nq + 1 + j  # [GP] the context each query row sees
        if SPARSE:
            streaming = tl.load(stream_ptr + kvh) != 0
            sk = tl.where(streaming, stream_sink, sink)
            rc = tl.where(streaming, stream_local, recent)
            nsel = tl.where(streaming, 0, k_sel)
        else:  # dense; a sliding-window layer reads each query's last `window` keys
            sk = 0
            rc = tl.where(window > 0, window, ctx)
            nsel = 0
        # The program walks the units of the widest context's fixed ranges (the recent range of the
        # oldest query starts earliest) and its chosen units; each query row masks what it does not read.
        first_ctx = ctx - nq + 1
        last_u = tl.cdiv(ctx, UT)
        rec_start_min = tl.maximum(first_ctx - rc, 0)
        rec_start = tl.maximum(qctx - rc, 0)  # [GP]
        if SPARSE:
            by_units = (recent_units > 0) & (not streaming)
            rec_start_min = tl.where(by_units, tl.maximum((tl.cdiv(first_ctx, UT) - recent_units) * UT, 0),
                                     rec_start_min)
            rec_start = tl.where(by_units, tl.maximum((tl.cdiv(qctx, UT) - recent_units) * UT, 0), rec_start)
        n_sink_u = tl.minimum(tl.cdiv(sk, UT), last_u)
        first_rec_u = tl.maximum(rec_start_min // UT, n_sink_u)
        n_fixed = n_sink_u + tl.maximum(last_u - first_rec_u, 0)
        n_units = n_fixed + nsel
        per = tl.cdiv(n_units, S)
        lo = split * per
        hi = tl.minimum(lo + per, n_units)

        d = tl.arange(0, D)
        n = tl.arange(0, UT)
        q = tl.load(q_ptr + ((q0 + j) * HQ + heads)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for i in range(lo, hi):
            u = tl.where(i < n_sink_u, i, first_rec_u + i - n_sink_u)
            if SPARSE:
                chosen = i >= n_fixed
                uc = tl.load(units_ptr + b * u_stride_b + row * u_stride_r + (i - n_fixed), mask=chosen,
                             other=-1)
                u = tl.where(chosen, uc, u)
            pos = u * UT + n
            loaded = (pos < ctx) & (u >= 0)
            valid = loaded[None, :] & (pos[None, :] < qctx[:, None]) & live[:, None]
            if SPARSE:
                fixed = (pos[None, :] < sk) | (pos[None, :] >= rec_start[:, None])  # [GP, UT]
                valid = valid & (fixed != chosen)
            else:
                valid = valid & (pos[None, :] >= rec_start[:, None])
            page = tl.load(bt_ptr + b * bt_stride + pos // PS, mask=loaded, other=0).to(tl.int64)
            off = ((page * PS + pos % PS) * HKV + kvh) * D
            voff = off
            if VT:  # values where the value tables say (offload: the device value cache's slots)
                vpage = tl.load(vt_ptr + b * vt_stride + pos // PS, mask=loaded, other=0).to(tl.int64)
                voff = ((vpage * PS + pos % PS) * HKV + kvh) * D
            k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=loaded[:, None], other=0.0).to(q.dtype)
            v = tl.load(vc_ptr + voff[:, None] + d[None, :], mask=loaded[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        ok = l_i > 0
        out = acc / tl.where(ok, l_i, 1.0)[:, None]
        lse = tl.where(ok, m_i + tl.log2(tl.where(ok, l_i, 1.0)), float("-inf"))
        part = ((q0 + j) * HQ + heads) * S + split
        tl.store(o_ptr + part[:, None] * D + d[None, :], out, mask=live[:, None])
        tl.store(lse_ptr + part, lse, mask=live)

    @triton.jit
    def _combine_kernel(o_ptr, lse_ptr, out_ptr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        lse = tl.load(lse_ptr + bh * S + s, mask=s < S, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        o = tl.load(o_ptr + (bh * S + s)[:, None] * D + d[None, :], mask=(s < S)[:, None], other=0.0)
        tot = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(tot > 0, tot, 1.0)
        tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(batch: int, rows: int, max_units: int, device: torch.device) -> int:
    """Enough programs for ~4 waves of the multiprocessors, never more splits than units."""
    if device.type != "cuda":  # Triton's interpreter, in tests
        return max(1, min(max_units, 4))
    target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(max_units, triton.cdiv(target, max(1, batch * rows)), 256))


def _launch(q, k_cache, v_cache, page_tables, context_lens, scale, *, qpr, units, streaming_kv, sink,
            recent, recent_units, stream_sink, stream_local, unit_tokens, max_units, num_splits, num_warps,
            num_stages, query_start_loc, max_query_len, window=0, value_tables=None):
    t, hq, d = q.shape
    b = page_tables.shape[0]
    _, ps, hkv, _ = k_cache.shape
    rows = hq // qpr
    s = num_splits or choose_splits(b, rows, max_units, q.device)
    o_part = torch.empty(t, hq, s, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, hq, s, dtype=torch.float32, device=q.device)
    out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    if k_cache.element_size() == 1 and q.dtype == torch.bfloat16:
        # fp8 pages: compute in fp16, which holds every fp8 value exactly and is one conversion away
        # (bf16 is three on Hopper: the fp8 kernels ran 0.83x bf16 pages at 32K x 16 that way)
        q = q.to(torch.float16)
    sparse = units is not None
    dummy = context_lens
    nq = 1 if query_start_loc is None else max_query_len
    _decode_split_kernel[(b, rows, s)](
        q.contiguous(), k_cache, v_cache, page_tables, page_tables if value_tables is None else value_tables,
        context_lens,
        dummy if query_start_loc is None else query_start_loc,
        units if sparse else dummy, streaming_kv if sparse else dummy, o_part, lse,
        scale * 1.4426950408889634, page_tables.stride(0),
        page_tables.stride(0) if value_tables is None else value_tables.stride(0),
        units.stride(0) if sparse else 0, units.stride(1) if sparse else 0,
        units.shape[2] if sparse else 0, sink, recent, recent_units, stream_sink, stream_local, window,
        HQ=hq, HKV=hkv, D=d, PS=ps, QPR=qpr, NQ=nq, GP=max(16, triton.next_power_of_2(qpr * nq)),
        UT=unit_tokens, S=s, SPARSE=sparse, VT=value_tables is not None, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages)
    _combine_kernel[(t * hq,)](o_part, lse, out, S=s, SP=triton.next_power_of_2(s), D=d, num_warps=4)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float | None = None, *, block_n: int = 64,
                 num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 query_start_loc: torch.Tensor | None = None, max_query_len: int = 1,
                 window: int | None = None, value_tables: torch.Tensor | None = None) -> torch.Tensor:
    """Dense decode. q [B, Hq, D]; one layer's k/v_cache [pages, page_size, Hkv, D]; page_tables [B, P]
    int32; context_lens [B] int32 (0 = padded row, output 0) -> [B, Hq, D]. `window`: a sliding-window
    layer's, each query reads only its last `window` keys (only their pages are loaded). value_tables
    [B, P] int32: where values sit when not at their pages' own slots (offload), else None.

    Verify steps: q [T, Hq, D] holds sequence i's queries at rows query_start_loc[i]:query_start_loc[i+1]
    (at most max_query_len of them), its last ones, causal among themselves -> [T, Hq, D]."""
    hq, d = q.shape[1], q.shape[2]
    g = hq // k_cache.shape[2]
    max_units = triton.cdiv(page_tables.shape[1] * k_cache.shape[1], block_n)
    if window:
        max_units = min(max_units, triton.cdiv(window + max_query_len, block_n) + 1)
    return _launch(q, k_cache, v_cache, page_tables, context_lens, scale or 1.0 / math.sqrt(d), qpr=g,
                   units=None, streaming_kv=None, sink=0, recent=0, recent_units=0, stream_sink=0,
                   stream_local=0,
                   unit_tokens=block_n, max_units=max_units, num_splits=num_splits, num_warps=num_warps,
                   num_stages=num_stages, query_start_loc=query_start_loc, max_query_len=max_query_len,
                   window=window or 0, value_tables=value_tables)


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_tables: torch.Tensor,
                  context_lens: torch.Tensor, units: torch.Tensor, streaming_kv: torch.Tensor, *,
                  unit_tokens: int, sink: int, recent: int = 0, recent_units: int = 0, stream_sink: int,
                  stream_local: int, scale: float | None = None, num_splits: int | None = None,
                  num_warps: int = 4, num_stages: int = 2, query_start_loc: torch.Tensor | None = None,
                  max_query_len: int = 1, value_tables: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse decode. units [B, R, K] int32 chosen units per selector row (R = Hq: per query head;
    R = Hkv: shared by a GQA group), -1 padded; streaming_kv [Hkv] int32 (1 = streaming head). Retrieval
    rows always read [0, sink) and either the last `recent` tokens or the newest `recent_units` units.
    Verify steps and value_tables as in paged_decode; a sequence's queries share its units."""
    hq, d = q.shape[1], q.shape[2]
    qpr = hq // units.shape[1]
    max_units = (triton.cdiv(max(sink, stream_sink), unit_tokens) + recent_units + triton.cdiv(
        max(recent, stream_local), unit_tokens) + 1 + units.shape[2] + max_query_len)
    return _launch(q, k_cache, v_cache, page_tables, context_lens, scale or 1.0 / math.sqrt(d), qpr=qpr,
                   units=units, streaming_kv=streaming_kv, sink=sink, recent=recent,
                   recent_units=recent_units, stream_sink=stream_sink,
                   stream_local=stream_local, unit_tokens=unit_tokens, max_units=max_units,
                   num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                   query_start_loc=query_start_loc, max_query_len=max_query_len, value_tables=value_tables)
