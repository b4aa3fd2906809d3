"""Plain-torch references for every kernel in this package: slow, obvious, and the tests' ground truth.

Shapes follow attention/base.py: one layer's cache is k, v [pages, page_size, Hkv, D] and
kmin, kmax, kmean [pages, page_size // summary_tokens, Hkv, D]; a sequence's token at position p lives in
page page_tables[b, p // page_size], row p % page_size.
"""

from __future__ import annotations

import torch

from needle.kvcache.summaries import summarise_pages


def kv_append_ref(k_cache, v_cache, summaries, k, v, slot_mapping, summary_tokens: int) -> None:
    """Store k, v [T, Hkv, D] at their flat slots (slot < 0: skip) and make every touched summary's
    summaries (kmin, kmax, kmean) the exact min/max/mean over its rows 0..last row written (older rows
    stay, later rows of a reused page are ignored)."""
    keep = slot_mapping >= 0
    slots, k, v = slot_mapping[keep], k[keep], v[keep]
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, hkv, d)[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, hkv, d)[slots] = v.to(v_cache.dtype)
    if summaries is not None:
        summarise_pages(k_cache, summaries, slots, summary_tokens)  # the CPU path's own recomputation


def gather_tokens(cache: torch.Tensor, page_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache [pages, page_size, Hkv, D], positions [N] of one sequence -> [N, Hkv, D]."""
    ps = cache.shape[1]
    pages = page_table.long()[positions // ps]
    return cache[pages, positions % ps]


def decode_token_mask(ctx: int, *, streaming: bool, sink: int, recent: int, units: torch.Tensor | None,
                      unit_tokens: int, device, recent_units: int = 0) -> torch.Tensor:
    """[ctx] bool: the tokens one head reads at decode. Every head reads its sinks [0, sink) and recent
    tokens [ctx - recent, ctx) (or its newest recent_units units); a retrieval head also reads the tokens
    of its selected units (-1 = none)."""
    pos = torch.arange(ctx, device=device)
    if recent_units and not streaming:
        recent = ctx - max((-(-ctx // unit_tokens) - recent_units) * unit_tokens, 0)
    mask = (pos < sink) | (pos >= ctx - recent)
    if not streaming and units is not None:
        u = units[units >= 0].long()
        picked = torch.zeros(ctx, dtype=torch.bool, device=device)
        if u.numel():
            tok = (u[:, None] * unit_tokens + torch.arange(unit_tokens, device=device)[None, :]).flatten()
            picked[tok[tok < ctx]] = True
        mask |= picked
    return mask


def paged_decode_ref(q, k_cache, v_cache, page_tables, context_lens, scale: float, *,
                     streaming_kv: torch.Tensor | None = None, sink: int = 0, recent: int | None = None,
                     stream_sink: int = 0, stream_local: int = 0, units: torch.Tensor | None = None,
                     unit_tokens: int = 64, recent_units: int = 0) -> torch.Tensor:
    """Decode attention for one new token per sequence, float64. q [B, Hq, D] -> [B, Hq, D].

    Dense when recent is None. Sparse otherwise: streaming KV heads (streaming_kv [Hkv] bool) read
    [0, stream_sink) + the last stream_local tokens; retrieval heads read [0, sink) + the last `recent`
    tokens + their selected units (units [B, R, K], R = Hq or Hkv selector rows, -1 padded)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(context_lens[i])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        ks = gather_tokens(k_cache, page_tables[i], pos).double()
        vs = gather_tokens(v_cache, page_tables[i], pos).double()
        for h in range(hq):
            kvh = h // g
            if recent is None:
                mask = torch.ones(n, dtype=torch.bool, device=q.device)
            elif streaming_kv is not None and bool(streaming_kv[kvh]):
                mask = decode_token_mask(n, streaming=True, sink=stream_sink, recent=stream_local,
                                         units=None, unit_tokens=unit_tokens, device=q.device)
            else:
                row = h if units.shape[1] == hq else kvh
                mask = decode_token_mask(n, streaming=False, sink=sink, recent=recent, units=units[i, row],
                                         unit_tokens=unit_tokens, device=q.device, recent_units=recent_units)
            s = (ks[mask, kvh] @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ vs[mask, kvh]
    return out


def verify_as_decodes(query_start_loc: torch.Tensor, context_lens: torch.Tensor, page_tables: torch.Tensor,
                      units: torch.Tensor | None = None):
    """A verify step as the decode steps it stands for: one row per query, at its own position, with its
    sequence's page table (and units). -> (context_lens [T], page_tables [T, P], units [T, R, K] | None)."""
    starts = query_start_loc.tolist()
    seq, ctx = [], []
    for i in range(len(starts) - 1):
        n = starts[i + 1] - starts[i]
        seq += [i] * n
        ctx += [max(int(context_lens[i]) - n + 1 + j, 0) for j in range(n)]
    idx = torch.tensor(seq, device=page_tables.device)
    return (torch.tensor(ctx, dtype=context_lens.dtype, device=context_lens.device), page_tables[idx],
            None if units is None else units[idx])


def page_scores_ref(q, kmin, kmax, page_tables, context_lens, summary_tokens: int, unit_tokens: int, *,
                    shared: bool) -> torch.Tensor:
    """Quest bound sum_c max(q_c*kmin_c, q_c*kmax_c) per summary, max over the summaries of each
    unit (and over the q heads of a GQA group when shared) -> [B, R, U] float32 (R = Hkv when shared else
    Hq; U = max_pages * page_size // unit_tokens), -inf for units past the context. q [B, Hq, D]."""
    b, hq, d = q.shape
    _, nblk, hkv, _ = kmin.shape
    g = hq // hkv
    pages = page_tables.long()
    mx = kmax[pages].reshape(b, -1, hkv, d).float()  # [B, L, Hkv, D], L summaries
    mn = kmin[pages].reshape(b, -1, hkv, d).float()
    qf = q.float().view(b, hkv, g, d)
    bound = (torch.einsum("bhgd,blhd->bhgl", qf.clamp(min=0), mx)
             + torch.einsum("bhgd,blhd->bhgl", qf.clamp(max=0), mn))  # [B, Hkv, G, L]
    nl = bound.shape[-1]
    start = torch.arange(nl, device=q.device) * summary_tokens
    bound = bound.masked_fill(start >= context_lens.view(-1, 1, 1, 1).long(), float("-inf"))
    per_unit = unit_tokens // summary_tokens
    nu = nl // per_unit
    bound = bound[..., : nu * per_unit].reshape(b, hkv, g, nu, per_unit).amax(-1)
    if shared:
        return bound.amax(2)
    return bound.reshape(b, hkv * g, nu)


def select_units_ref(scores: torch.Tensor, allowed: torch.Tensor, k: int,
                     k_per_seq: torch.Tensor | None = None) -> torch.Tensor:
    """Top k allowed units of scores [B, R, U] -> [B, R, k] int32 in ascending unit order, -1 padded;
    sequence b keeps only its best k_per_seq[b]."""
    if k_per_seq is not None:
        return _select_each(scores, allowed, k, k_per_seq)
    s = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    kk = min(k, s.shape[-1])
    vals, idx = s.topk(kk, dim=-1)
    idx = idx.masked_fill(~allowed.gather(1, idx.flatten(1)).view_as(idx), -1)
    idx = torch.where(idx < 0, torch.iinfo(torch.int32).max, idx).sort(-1).values
    idx = torch.where(idx == torch.iinfo(torch.int32).max, -1, idx)
    return torch.nn.functional.pad(idx, (0, k - kk), value=-1).int()


def _select_each(scores, allowed, k, k_per_seq):
    rows = []
    for b in range(scores.shape[0]):
        kb = int(k_per_seq[b])
        got = select_units_ref(scores[b:b + 1], allowed[b:b + 1], kb)[0]
        rows.append(torch.nn.functional.pad(got, (0, k - kb), value=-1))
    return torch.stack(rows)


def prefill_ref(q, k, v, scale: float, *, q_offset: int, sink: int | None = None,
                local: int | None = None) -> torch.Tensor:
    """Causal attention of q [Lq, Hq, D] at positions q_offset.. over k, v [Lk, Hkv, D] (positions 0..),
    float64; with sink/local a query at p reads keys j <= p with j < sink or j > p - local."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    qp = torch.arange(lq, device=q.device)[:, None] + q_offset
    kp = torch.arange(lk, device=q.device)[None, :]
    mask = kp <= qp
    if sink is not None:
        mask &= (kp < sink) | (kp > qp - local)
    kk = k.double().repeat_interleave(g, 1).transpose(0, 1)
    vv = v.double().repeat_interleave(g, 1).transpose(0, 1)
    s = (q.double().transpose(0, 1) @ kk.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(0, 1)
