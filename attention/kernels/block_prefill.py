"""Block-sparse prefill for retrieval heads: each block of queries reads only the key blocks that matter.

Dense causal prefill costs O(L^2) per head, which is most of the time to first token at 128K. Here the
context is cut into `block`-token blocks at absolute positions; the chunk's queries fall into the same
blocks. For each KV head and query block:
  * estimate how much attention each causal key block gets, from antidiagonal sums (XAttention's idea):
    with stride S, a query group of S rows and a key group of S keys score as sum_t q[S-1-t] . k[t], one
    matmul of [L/S, S*D] rows, 1/S of the dense cost; a softmax over the key groups (the group's query
    heads summed) turns those into shares, pooled per block;
  * always read block 0 (the attention sinks), the diagonal block and the one before it; add the best
    other blocks until the query block reads `density` of its causal blocks;
  * the chunk's last `block` queries attend densely (`prefill_block_sparse`): at a prompt's end sits the
    question, whose reading of the far context the answer depends on (on Gemma-3-270M, needle at 8K,
    density 0.25 lost 20-30 points without this, QUALITY.md). They run apart from the block kernel,
    where one query block reading its whole context would make every other program wait for it.
The attention itself runs over the chosen blocks only, exact within them (causal inside the diagonal).
With density 1 every causal block is chosen and the result is dense attention.

`prefill_blocks` picks the blocks (torch, any device); `block_sparse_prefill_torch` attends over them
(the CPU path and the reference); `block_sparse_prefill` is the Triton kernel for CUDA;
`prefill_block_sparse` puts a chunk together from either.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from needle.attention.kernels import HAS_TRITON, dot_precision, tl, triton

BLOCK = 128
STRIDE = 16
ALWAYS_PREVIOUS = 1  # key blocks before the diagonal read by every query block


def skips_blocks(ctx: int, density: float, block: int = BLOCK) -> bool:
    """Whether a prefill at `density` over a ctx-token context leaves any key block out (else: dense)."""
    blocks = (ctx + block - 1) // block
    return 0.0 < density < 1.0 and max(math.ceil(density * blocks), 2 + ALWAYS_PREVIOUS) < blocks


def _query_blocks(n: int, ctx: int, block: int) -> tuple[int, int]:
    """(first, count) of the absolute blocks the chunk's queries (the last n positions of ctx) fall in."""
    first = (ctx - n) // block
    return first, (ctx - 1) // block - first + 1


def _pad_queries(q: torch.Tensor, ctx: int, block: int) -> tuple[torch.Tensor, int, int]:
    """q [n, ...] (the last n positions of ctx) laid into whole query blocks, zeros around ->
    (padded [QB * block, ...], the first block's index, the chunk's first row inside it)."""
    n = q.shape[0]
    first, nqb = _query_blocks(n, ctx, block)
    start = ctx - n - first * block
    q_pad = q.new_zeros(nqb * block, *q.shape[1:])
    q_pad[start: start + n] = q
    return q_pad, first, start


def causal_blocks(n: int, ctx: int, hkv: int, block: int, device: torch.device) -> torch.Tensor:
    """Every key block each query block may see -> [Hkv, QB, K] int32, ascending, -1 padded (dense)."""
    first, nqb = _query_blocks(n, ctx, block)
    qb = first + torch.arange(nqb, device=device)[:, None]
    kb = torch.arange(first + nqb, device=device)[None, :]
    return torch.where(kb <= qb, kb, -1).to(torch.int32).expand(hkv, -1, -1)


def block_shares(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = BLOCK,
                 stride: int = STRIDE) -> torch.Tensor:
    """Estimated attention share of every key block for every query block, per KV head.

    q [n, Hkv, G, D] are the last n positions of k [ctx, Hkv, D] -> [Hkv, QB, KB] (rows sum to <= G)."""
    n, hkv, g, d = q.shape
    ctx = k.shape[0]
    q_pad, first, _ = _pad_queries(q, ctx, block)
    nqb = q_pad.shape[0] // block
    kb = (ctx + block - 1) // block
    k_pad = k.new_zeros(kb * block, hkv, d)
    k_pad[:ctx] = k
    # the softmax scale (and 1/stride: a mean logit) folded into q; logits in q's dtype, softmax in fp32
    qr = (q_pad * (scale / stride)).view(-1, stride, hkv, g, d).flip(1).permute(2, 3, 0, 1, 4)
    kr = k_pad.view(-1, stride, hkv, d).permute(2, 0, 1, 3).reshape(hkv, -1, stride * d)
    # the group's query heads as rows of one matmul per KV head (a broadcast would copy the keys G times)
    logits = torch.bmm(qr.reshape(hkv, -1, stride * d), kr.transpose(1, 2)).view(hkv, g, -1, kr.shape[1])
    # causal at group granularity: only the chunk's own groups hide keys, and the padding past ctx
    own = first * block // stride
    nq = logits.shape[-2]
    logits[..., own: own + nq].masked_fill_(torch.ones(nq, nq, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
    logits[..., (ctx + stride - 1) // stride:] = float("-inf")
    shares = logits.softmax(-1, dtype=torch.float32).sum(1)
    per = block // stride
    return shares.view(hkv, nqb, per, kb, per).sum((2, 4))


def prefill_blocks(q: torch.Tensor, k: torch.Tensor, scale: float, density: float, block: int = BLOCK,
                   stride: int = STRIDE) -> torch.Tensor:
    """The key blocks each query block reads -> [Hkv, QB, K] int32, ascending, -1 padded.

    q [n, Hkv, G, D] are the last n positions of k [ctx, Hkv, D]; a query block whose context holds c
    blocks reads max(ceil(density * c), its always-read blocks) of them."""
    n, ctx = q.shape[0], k.shape[0]
    if density >= 1.0:  # every causal block: no estimate needed
        return causal_blocks(n, ctx, k.shape[1], block, q.device).contiguous()
    first, nqb = _query_blocks(n, ctx, block)
    shares = block_shares(q, k, scale, block, stride)
    qb = first + torch.arange(nqb, device=q.device)[:, None]  # absolute query block
    kb = torch.arange(shares.shape[-1], device=q.device)[None, :]
    causal = kb <= qb
    always = (kb == 0) | ((kb <= qb) & (kb >= qb - ALWAYS_PREVIOUS))
    shares = shares.masked_fill(always, float("inf")).masked_fill(~causal, float("-inf"))
    count = (qb[:, 0] + 1).float()
    keep = torch.maximum(torch.ceil(density * count), always.sum(1).float()).clamp(max=count).long()
    k_max = int(keep.max())
    top = shares.topk(k_max, dim=-1).indices  # [Hkv, QB, K] best first
    rank = torch.arange(k_max, device=q.device)
    chosen = torch.where(rank[None, None, :] < keep[None, :, None], top, shares.shape[-1])
    chosen = chosen.sort(-1).values
    return torch.where(chosen == shares.shape[-1], -1, chosen).to(torch.int32)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]
Dense = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def prefill_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, density: float,
                         attend: Attend, dense: Dense | None = None, block: int = BLOCK) -> torch.Tensor:
    """A chunk's retrieval-head attention: q [n, Hkv, G, D] are the last n positions of k, v [ctx, Hkv, D].
    All but the last `block` rows read their chosen blocks through attend(q, k, v, scale, blocks); the
    last rows attend densely, through dense(q, k, v, scale) (a faster dense kernel) or else attend over
    every causal block (density 1) -> [n, Hkv, G, D]."""
    n, ctx = q.shape[0], k.shape[0]
    tail = min(n, block)
    out = torch.empty_like(q)
    if n > tail:
        head_q, seen = q[: n - tail], ctx - tail
        out[: n - tail] = attend(head_q, k[:seen], v[:seen], scale,
                                 prefill_blocks(head_q, k[:seen], scale, density, block))
    tail_q = q[n - tail:]
    out[n - tail:] = dense(tail_q, k, v, scale) if dense else attend(
        tail_q, k, v, scale, prefill_blocks(tail_q, k, scale, 1.0, block))
    return out


def block_sparse_prefill_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               blocks: torch.Tensor, block: int = BLOCK,
                               group_blocks: int = 8) -> torch.Tensor:
    """Attention of q [n, Hkv, G, D] (the last n positions of k, v [ctx, Hkv, D]) over the key blocks
    `blocks` [Hkv, QB, K] -> [n, Hkv, G, D]; `group_blocks` query blocks at a time bound the memory."""
    n, hkv, g, d = q.shape
    ctx = k.shape[0]
    q_pad, first, start = _pad_queries(q, ctx, block)
    nqb = q_pad.shape[0] // block
    out = torch.empty_like(q_pad)
    offs = torch.arange(block, device=q.device)
    heads = torch.arange(hkv, device=q.device)[:, None, None]
    for a in range(0, nqb, group_blocks):
        e = min(a + group_blocks, nqb)
        idx = blocks[:, a:e].long()  # [Hkv, b, K]
        kpos = (idx[..., None] * block + offs).flatten(-2)  # [Hkv, b, K*block]
        qpos = (first + torch.arange(a, e, device=q.device))[:, None] * block + offs  # [b, block]
        mask = (idx[..., None] >= 0).expand(*idx.shape, block).flatten(-2)[:, :, None, :]
        mask = mask & (kpos[:, :, None, :] <= qpos[None, :, :, None]) & (kpos[:, :, None, :] < ctx)
        kp = kpos.clamp(0, ctx - 1)
        keys, values = k[kp, heads], v[kp, heads]  # [Hkv, b, K*block, D]
        b = e - a
        rows = q_pad[a * block: e * block].view(b, block, hkv, g, d).permute(2, 0, 3, 1, 4)
        mask = mask[:, :, None].expand(hkv, b, g, block, mask.shape[-1]).reshape(hkv, b, g * block, -1)
        att = F.scaled_dot_product_attention(rows.reshape(hkv, b, g * block, d), keys, values,
                                             attn_mask=mask, scale=scale)  # [Hkv, b, G*block, D]
        att = att.view(hkv, b, g, block, d).permute(1, 3, 0, 2, 4)
        out[a * block: e * block] = att.reshape(-1, hkv, g, d)
    return out[start: start + n]


if HAS_TRITON:

    @triton.autotune(configs=[triton.Config({"BN": bn}, num_warps=w, num_stages=st)
                              for bn in (64, 128) for w in (4, 8) for st in (2, 3)],
                     key=["D", "G"])
    @triton.jit
    def _block_prefill_kernel(q_ptr, k_ptr, v_ptr, blocks_ptr, counts_ptr, o_ptr, qk_scale, n, ctx,
                              first_block, sq_t, sq_h, sk_t, sk_h, so_t, so_h, sb_h, sb_q, sc_h,
                              G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              PRECISION: tl.constexpr):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        kv = h // G
        rows = (first_block + qb) * BM + tl.arange(0, BM)  # absolute query positions
        row_ok = (rows >= ctx - n) & (rows < ctx)
        t = rows - (ctx - n)
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + t[:, None] * sq_t + h * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([BM], float("-inf"), tl.float32)
        s_sum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        sub: tl.constexpr = BM // BN
        steps = tl.load(counts_ptr + kv * sc_h + qb) * sub
        for it in range(steps):  # one BN-key tile per step: no branch, so the loads pipeline
            kb = tl.load(blocks_ptr + kv * sb_h + qb * sb_q + it // sub)
            cols = kb * BM + (it % sub) * BN + tl.arange(0, BN)
            col_ok = cols < ctx
            kt = tl.load(k_ptr + cols[None, :] * sk_t + kv * sk_h + dims[:, None], mask=col_ok[None, :],
                         other=0.0)
            scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            scores = tl.where(col_ok[None, :] & (cols[None, :] <= rows[:, None]), scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            s_sum = s_sum * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptr + cols[:, None] * sk_t + kv * sk_h + dims[None, :], mask=col_ok[:, None],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m = m_new
        out = acc / tl.where(s_sum == 0.0, 1.0, s_sum)[:, None]
        tl.store(o_ptr + t[:, None] * so_t + h * so_h + dims[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


def block_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         blocks: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The Triton kernel: block_sparse_prefill_torch's result for CUDA tensors, q [n, Hq, D] (query heads
    of a KV head adjacent), k, v [ctx, Hkv, D] (same strides, unit stride over D) -> [n, Hq, D]."""
    n, hq, d = q.shape
    ctx, hkv, _ = k.shape
    first, nqb = _query_blocks(n, ctx, block)
    out = torch.empty_like(q)
    blocks = blocks.contiguous()
    counts = (blocks >= 0).sum(-1, dtype=torch.int32)  # [Hkv, QB]: chosen blocks lead, -1 pads
    _block_prefill_kernel[(nqb, hq)](
        q, k, v, blocks, counts, out, scale * 1.4426950408889634, n, ctx, first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        blocks.stride(0), blocks.stride(1), counts.stride(0), G=hq // hkv, D=d, BM=block,
        PRECISION=dot_precision(q.dtype))
    return out
