"""Prefill attention: dense causal for retrieval heads, sink + local block-sparse for streaming heads.

Both run on torch's attention kernels: dense through SDPA (cuDNN on the H200, 619 TFLOP/s causal at 32K,
see ../shared/gpu-calibration.json) or, for a chunk after earlier context, two cuDNN calls merged by
log-sum-exp (the aten flash op, bottom-right causal, runs at about half that rate there); streaming heads
through flash's sliding window plus a small torch pass over the sinks, merged by log-sum-exp. Where
those ops are missing, SDPA with masks.
The caller hands contiguous keys and values by position: the step's own k/v when the sequence has no
earlier context, else the context gathered from its pages (gather_context).

Streaming heads: a query at position p reads keys j <= p with j < sink or j > p - local; the fallback
takes queries in blocks of `block` rows, each reading only the sink and the keys from its first query's
window start on, so the cost is O(L * (sink + local + block)) instead of O(L^2).
Reference: reference.prefill_ref.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover
    causal_lower_right = None


def gather_context(cache: torch.Tensor, page_table: torch.Tensor, n: int) -> torch.Tensor:
    """cache [pages, page_size, Hkv, D] -> the first n tokens of one sequence, [n, Hkv, D]."""
    ps = cache.shape[1]
    pages = page_table[: (n + ps - 1) // ps].long()
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
    out = _chunk_cudnn(q, k, v, scale)
    if out is not None:
        return out
    flash = _flash(q, k, v, scale)
    if flash is not None:
        return flash[0]
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


_FLASH_OK = True
_CUDNN_OK: bool | None = None  # None: not yet checked against flash on this machine


def _fast_kernels_apply(q: torch.Tensor) -> bool:
    """flash and cuDNN attention are for 16-bit CUDA tensors: fp32 takes SDPA's exact kernels (cuDNN
    would compute it in TF32, whose errors flip greedy tokens against the torch path)."""
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _cudnn(q, k, v, scale, causal: bool):
    """cuDNN attention (what SDPA picks on Hopper; ~2x the aten flash kernel there) on token-major
    tensors -> (out [Lq, Hq, D], natural-log lse [Hq, Lq]); causal is top-left, so only for squares."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True, 0.0, causal,
        False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], -1)[:, : q.shape[0]].float()


def _chunk_cudnn(q, k, v, scale):
    """A chunk after earlier context as two cuDNN calls: the queries against all earlier keys (no mask)
    and against their own keys (causal square), merged by log-sum-exp. Checked once against flash."""
    global _CUDNN_OK
    if _CUDNN_OK is False or not _fast_kernels_apply(q):
        return None
    p = k.shape[0] - q.shape[0]
    try:
        o1, l1 = _cudnn(q, k[:p], v[:p], scale, causal=False)
        o2, l2 = _cudnn(q, k[p:], v[p:], scale, causal=True)
    except (RuntimeError, TypeError, AttributeError):
        _CUDNN_OK = False
        return None
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(0, 1)[..., None]
    w2 = torch.exp(l2 - lse).transpose(0, 1)[..., None]
    out = (o1.float() * w1 + o2.float() * w2).to(q.dtype)
    if _CUDNN_OK is None:
        ref = _flash(q, k, v, scale)
        if ref is not None:
            err = ((out.float() - ref[0].float()).norm() / ref[0].float().norm()).item()
            _CUDNN_OK = err < 2e-2
            if not _CUDNN_OK:
                return ref[0]
    return out


def _flash(q, k, v, scale, window: int | None = None, causal: bool = True):
    """Flash attention forward on token-major tensors, causal aligned bottom-right (q are the last
    positions), GQA native, optional sliding window of `window` keys -> (out [Lq, Hq, D], lse [Hq, Lq])
    or None where the op is unavailable (CPU, old torch)."""
    global _FLASH_OK
    if not _FLASH_OK or not _fast_kernels_apply(q):
        return None
    try:
        out, lse = torch.ops.aten._flash_attention_forward(
            q[None], k[None], v[None], None, None, q.shape[0], k.shape[0], 0.0, causal, False, scale=scale,
            window_size_left=None if window is None else window - 1,
            window_size_right=None if window is None else 0)[:2]
    except (RuntimeError, TypeError, AttributeError):
        _FLASH_OK = False
        return None
    return out[0], lse.reshape(q.shape[1], -1)[:, : q.shape[0]]


def _merge(out, lse, o2, lse2) -> None:
    """out [L, H, D] (lse [H, L]) := softmax-merge of out and o2 (lse2), in place."""
    w = torch.sigmoid(lse - lse2).transpose(0, 1)[..., None].to(out.dtype)  # = e^lse / (e^lse + e^lse2)
    out.copy_(torch.lerp(o2, out, w))


def _streaming_flash(q, k, v, scale, sink, local):
    """Window keys through flash (sliding window); the sinks left of each window through flash too for
    queries past every sink, in float32 torch for the first few rows whose window still covers some
    sinks; merged by log-sum-exp."""
    got = _flash(q, k, v, scale, window=local)
    if got is None:
        return None
    out, lse = got
    if sink == 0:  # a plain sliding window
        return out
    lq, lk = q.shape[0], k.shape[0]
    off = lk - lq
    split = min(lq, max(0, sink + local - 1 - off))  # rows from here on see all sinks left of the window
    if split < lq:
        o_s, lse_s = _flash(q[split:], k[:sink], v[:sink], scale, causal=False)
        _merge(out[split:], lse[:, split:], o_s, lse_s)
    if split == 0:
        return out
    pos = torch.arange(off, off + split, device=q.device)
    g = q.shape[1] // k.shape[1]
    qa = q[:split].float().view(split, k.shape[1], g, -1)
    s = torch.einsum("thgd,shd->thgs", qa, k[:sink].float()) * scale
    hidden = torch.arange(sink, device=q.device)[None, :] <= (pos[:, None] - local)  # left of the window
    s = s.masked_fill(~hidden[:, None, None, :], float("-inf"))
    lse_s = torch.logsumexp(s, -1)  # [rows, Hkv, G]; -inf where no sink is left of the window
    o_s = torch.einsum("thgs,shd->thgd", torch.exp(s - lse_s[..., None]).nan_to_num(0.0), v[:sink].float())
    lse_w = lse[:, :split].transpose(0, 1).reshape(split, k.shape[1], g)
    w = torch.sigmoid(lse_w - lse_s)[..., None]
    o_w = out[:split].float().view(split, k.shape[1], g, -1)
    out[:split] = (o_s + (o_w - o_s) * w).reshape(split, q.shape[1], -1).to(out.dtype)
    return out


def prefill_streaming(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, sink: int,
                      local: int, block: int = 2048) -> torch.Tensor:
    """Sink + local attention of q [Lq, Hq, D] (the last Lq positions of k, v [Lk, Hkv, D]): a query at
    position p reads keys < sink and keys > p - local (sink = 0: a sliding window of `local` keys)."""
    lq, lk = q.shape[0], k.shape[0]
    off = lk - lq
    if lk <= sink + local:  # every query sees its whole causal past
        return prefill_dense(q, k, v, scale)
    flash = _streaming_flash(q, k, v, scale, sink, local)
    if flash is not None:
        return flash
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
