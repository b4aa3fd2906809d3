"""Prefill attention: dense causal for retrieval heads, sink + local block-sparse for streaming heads.

Both run on torch SDPA (its flash / memory-efficient kernels are the fastest right answer on the H200:
619 TFLOP/s causal at 32K, see ../shared/gpu-calibration.json). The caller hands contiguous keys and
values by position: the step's own k/v when the sequence has no earlier context, else the context
gathered from its pages (gather_context).

Streaming heads: a query at position p reads keys j <= p with j < sink or j > p - local. Queries go in
blocks of `block` rows; each block reads only the sink and the keys from its first query's window start
on, so the cost is O(L * (sink + local + block)) instead of O(L^2). Reference: reference.prefill_ref.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover
    causal_lower_right = None


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """cache [pages, page_size, Hkv, D] -> the first n tokens of one sequence, [n, Hkv, D]."""
    ps = cache.shape[1]
    pages = block_table[: (n + ps - 1) // ps].long()
    return cache[pages].flatten(0, 1)[:n]


def _sdpa(q, k, v, scale, *, causal=False, mask=None):
    """[L, H, D] tensors in, [Lq, Hq, D] out; GQA through enable_gqa, else by repeating KV heads."""
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    g = q.shape[1] // k.shape[1]
    if mask is not None or g == 1:
        if g > 1:
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def prefill_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D] are the last Lq positions of k, v [Lk, Hkv, D]; causal."""
    lq, lk = q.shape[0], k.shape[0]
    if lq == lk:
        return _sdpa(q, k, v, scale, causal=True)
    if lq == 1:
        return _sdpa(q, k, v, scale)
    if causal_lower_right is not None:
        g = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(g, 1) if g > 1 else k
        vv = v.repeat_interleave(g, 1) if g > 1 else v
        bias = causal_lower_right(lq, lk)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                             vv.transpose(0, 1)[None], attn_mask=bias, scale=scale)
        return out[0].transpose(0, 1)
    pos_q = torch.arange(lk - lq, lk, device=q.device)[:, None]
    return _sdpa(q, k, v, scale, mask=torch.arange(lk, device=q.device)[None, :] <= pos_q)


def prefill_streaming(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, sink: int,
                      local: int, block: int = 2048) -> torch.Tensor:
    """Sink + local attention of q [Lq, Hq, D] (the last Lq positions of k, v [Lk, Hkv, D])."""
    lq, lk = q.shape[0], k.shape[0]
    off = lk - lq
    if lk <= sink + local:  # every query sees its whole causal past
        return prefill_dense(q, k, v, scale)
    out = torch.empty_like(q)
    for a in range(0, lq, block):
        e = min(a + block, lq)
        p0, p1 = off + a, off + e  # query positions [p0, p1)
        w0 = max(p0 - local + 1, 0)
        ns = min(sink, w0)  # sink keys not already inside the window
        idx = torch.cat([torch.arange(ns, device=q.device), torch.arange(w0, p1, device=q.device)])
        qp = torch.arange(p0, p1, device=q.device)[:, None]
        kp = idx[None, :]
        mask = (kp <= qp) & ((kp < sink) | (kp > qp - local))
        if ns == 0:
            kb, vb = k[w0:p1], v[w0:p1]
        else:
            kb, vb = k[idx], v[idx]
        out[a:e] = _sdpa(q[a:e], kb, vb, scale, mask=mask)
    return out
