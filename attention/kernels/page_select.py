"""Page scoring (Quest's upper bound) and top-k unit selection for retrieval heads.

Scoring: one program per (sequence, KV head, run of units) loads each summary's kmin/kmax once for
all G query heads of the group and computes sum_c max(q_c*kmin_c, q_c*kmax_c) as two tensor-core dots,
relu(q).kmax + min(q, 0).kmin (exact: the products are the same). A unit of `unit_tokens` scores as the
max of its summaries (LServe's hierarchical paging; unit = one summary is flat Quest), and with
a shared selection as the max over the group's query heads too.

Selection: one program per (sequence, selector row) holds the row's scores in registers, finds the k-th
largest by bisection on the float bits (32 passes of a count), and compacts the winners in ascending unit
order with a prefix sum: no sort. Ties at the threshold go to the lower units. Only `allowed` units
compete; fewer than k allowed leaves -1 padding. References: reference.page_scores_ref / select_units_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from needle.attention.kernels import HAS_TRITON, dot_precision, tl, triton

if HAS_TRITON:

    @triton.jit
    def _score_kernel(q_ptr, kmin_ptr, kmax_ptr, bt_ptr, ctx_ptr, out_ptr, bt_stride, num_units,
                      HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                      SB: tl.constexpr, UB: tl.constexpr, UPP: tl.constexpr, GP: tl.constexpr,
                      SHARED: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        chunk = tl.program_id(2)
        G: tl.constexpr = HQ // HKV
        NB: tl.constexpr = PS // SB
        ctx = tl.load(ctx_ptr + b)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (b * HQ + kvh * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None],
                    other=0.0)
        qpos = tl.maximum(q, 0.0).to(kmax_ptr.dtype.element_ty)
        qneg = tl.minimum(q, 0.0).to(kmin_ptr.dtype.element_ty)
        j = chunk * (UPP * UB) + tl.arange(0, UPP * UB)  # summaries of this program
        start = j * SB
        valid = start < ctx
        page = tl.load(bt_ptr + b * bt_stride + start // PS, mask=valid, other=0).to(tl.int64)
        off = ((page * NB + (start % PS) // SB) * HKV + kvh) * D
        mx = tl.load(kmax_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        mn = tl.load(kmin_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = (tl.dot(qpos, tl.trans(mx), input_precision=PRECISION)
             + tl.dot(qneg, tl.trans(mn), input_precision=PRECISION))  # [GP, UPP*UB]
        s = tl.where(valid[None, :], s, float("-inf"))
        s = tl.max(tl.reshape(s, [GP, UPP, UB]), 2)  # [GP, UPP]
        u = chunk * UPP + tl.arange(0, UPP)
        if SHARED:
            s = tl.max(tl.where((g < G)[:, None], s, float("-inf")), 0)
            tl.store(out_ptr + (b * HKV + kvh) * num_units + u, s, mask=u < num_units)
        else:
            rows = b * HQ + kvh * G + g
            tl.store(out_ptr + rows[:, None] * num_units + u[None, :], s,
                     mask=(g < G)[:, None] & (u < num_units)[None, :])

    @triton.jit
    def _topk_kernel(score_ptr, allowed_ptr, k_ptr, out_ptr, num_units, k_out, R, out_sb, out_sr, sink_u,
                     recent_u, unit_tokens, NUP: tl.constexpr, KP: tl.constexpr, RULE: tl.constexpr,
                     K_EACH: tl.constexpr):
        b = tl.program_id(0)
        r = tl.program_id(1)
        k = k_out
        if K_EACH:
            k = tl.minimum(tl.load(k_ptr + b).to(tl.int32), k_out)
        u = tl.arange(0, NUP)
        inside = u < num_units
        x = tl.load(score_ptr + (b * R + r) * num_units + u, mask=inside, other=float("-inf"))
        if RULE:  # allowed_ptr holds the context lengths (see Choosable)
            ctx = tl.load(allowed_ptr + b).to(tl.int32)
            newest = tl.where(ctx > 0, (ctx - 1) // unit_tokens - recent_u + 1, 0)
            ok = (u >= sink_u) & (u < newest)
        else:
            ok = tl.load(allowed_ptr + b * num_units + u, mask=inside, other=0) != 0
        valid = ok & (x > float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # ordered like the floats
        n_valid = tl.sum(valid.to(tl.int32), 0)
        lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) >= k, count(key >= hi) < k
        hi = tl.full([], 2147483648, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            cnt = tl.sum((valid & (key >= mid)).to(tl.int32), 0)
            lo = tl.where(cnt >= k, mid, lo)
            hi = tl.where(cnt >= k, hi, mid)
        gt = valid & (key > lo)
        eq = valid & (key == lo)
        room = k - tl.sum(gt.to(tl.int32), 0)
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= room))
        sel = tl.where(n_valid <= k, valid, sel)
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        base = out_ptr + b * out_sb + r * out_sr
        tl.store(base + pos, u, mask=sel)
        n_sel = tl.sum(sel.to(tl.int32), 0)
        j = tl.arange(0, KP)
        tl.store(base + j, tl.full([KP], -1, tl.int32), mask=(j >= n_sel) & (j < k_out))


@dataclass(frozen=True)
class Choosable:
    """The units attention/sparse.py's allowed_units allows, as the rule the top-k kernel applies itself:
    at or past `sink_units` and older than each context's newest `recent_units` units. The decode fast
    path passes this rather than building the [B, U] mask, ~8 small launches per layer."""

    context_lens: torch.Tensor  # [B]
    unit_tokens: int
    sink_units: int
    recent_units: int


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_tables: torch.Tensor,
                context_lens: torch.Tensor, *, page_size: int, unit_tokens: int, shared: bool,
                units_per_program: int = 16) -> torch.Tensor:
    """q [B, Hq, D]; one layer's kmin/kmax [pages, page_size // sb, Hkv, D] -> unit scores [B, R, U]
    float32 (R = Hkv if shared else Hq, U = page-table width * page_size // unit_tokens), -inf past the
    context."""
    b, hq, d = q.shape
    _, nb, hkv, _ = kmin.shape
    sb = page_size // nb
    num_units = page_tables.shape[1] * page_size // unit_tokens
    rows = hkv if shared else hq
    out = torch.empty(b, rows, num_units, dtype=torch.float32, device=q.device)
    ub = unit_tokens // sb
    upp = max(1, min(units_per_program, 128 // ub))
    grid = (b, hkv, triton.cdiv(num_units, upp))
    _score_kernel[grid](q.contiguous(), kmin, kmax, page_tables, context_lens, out, page_tables.stride(0),
                        num_units, HQ=hq, HKV=hkv, D=d, PS=page_size, SB=sb, UB=ub, UPP=upp,
                        GP=max(16, triton.next_power_of_2(hq // hkv)), SHARED=shared,
                        PRECISION=dot_precision(kmax.dtype), num_warps=4)
    return out


def top_units(scores: torch.Tensor, allowed: torch.Tensor | Choosable, k: int,
              k_per_seq: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, R, U] float32, allowed [B, U] bool (or the rule) -> [B, R, k] int32 chosen units,
    ascending, -1 padded; sequence b keeps its best k_per_seq[b] (<= k) when given. `out`: a [B, R, k]
    view (last dim contiguous) to write them into, e.g. the kept selections themselves."""
    b, r, nu = scores.shape
    if out is None:
        out = torch.empty(b, r, k, dtype=torch.int32, device=scores.device)
    rule = isinstance(allowed, Choosable)
    mask, sink, recent, ut = ((allowed.context_lens, allowed.sink_units, allowed.recent_units,
                               allowed.unit_tokens) if rule else (allowed.to(torch.int8), 0, 0, 1))
    nup, kp = triton.next_power_of_2(nu), triton.next_power_of_2(k)
    _topk_kernel[(b, r)](scores, mask, scores if k_per_seq is None else k_per_seq, out, nu, k, r,
                         out.stride(0), out.stride(1), sink, recent, ut, NUP=nup, KP=kp, RULE=rule,
                         K_EACH=k_per_seq is not None, num_warps=min(16, max(4, nup // 512)))
    return out


def select_units(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_tables: torch.Tensor,
                 context_lens: torch.Tensor, allowed: torch.Tensor | Choosable, k: int, *, page_size: int,
                 unit_tokens: int, shared: bool, k_per_seq: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Score and pick: -> [B, R, k] int32 units per selector row (two launches, no host sync). allowed
    [B, U'] may be narrower than the page table's U units (the rest count as not allowed)."""
    scores = page_scores(q, kmin, kmax, page_tables, context_lens, page_size=page_size,
                         unit_tokens=unit_tokens, shared=shared)
    nu = scores.shape[2]
    if not isinstance(allowed, Choosable):
        if allowed.shape[1] < nu:
            allowed = torch.nn.functional.pad(allowed, (0, nu - allowed.shape[1]), value=False)
        allowed = allowed[:, :nu].contiguous()
    return top_units(scores, allowed, k, k_per_seq, out)
