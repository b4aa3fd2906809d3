"""Per-page key summaries for sparse attention: per-channel min, max and mean of the RoPE'd keys.

Each summary (`summary_tokens` tokens) of each KV head keeps kmin/kmax over its keys, which bounds
q.k for every key inside the page (Quest), and kmean, whose q.kmean is the page's mean logit (ShadowKV's
landmarks; a sharper ranking than the bound on small models, see QUALITY.md). A write touches a few
summaries; each touched one is recomputed from the keys just stored, over rows summary_start..last
row written. Recomputing rather than accumulating keeps the summary exact when a freed page is reused by
another sequence, and when rows are rewritten (speculative decoding rollback): rows past the last
written one are not yet part of the sequence, so they are ignored.
"""

from __future__ import annotations

import torch

from needle.kvcache.pool import KVPool


def update_summaries(pool: KVPool, layer: int, slot_mapping: torch.Tensor) -> None:
    """Refresh the summaries of every summary that `slot_mapping` wrote to in `layer` (after write)."""
    if pool.kmin is None or pool.kmax is None or pool.kmean is None:
        return
    summarise_pages(pool.k[layer], (pool.kmin[layer], pool.kmax[layer], pool.kmean[layer]), slot_mapping,
                    pool.spec.summary_tokens)


def summarise_pages(k_cache: torch.Tensor, summaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    slot_mapping: torch.Tensor, summary_tokens: int) -> None:
    """One layer: k_cache [pages, page_size, Hkv, D]; recompute (kmin, kmax, kmean), each
    [pages, page_size // summary_tokens, Hkv, D], of every summary a slot in slot_mapping names."""
    if slot_mapping.numel() == 0:
        return
    sb = summary_tokens
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    touched, inverse = torch.unique(slot_mapping // sb, return_inverse=True)  # flat logical-page ids
    last_row = torch.full_like(touched, -1).scatter_reduce_(0, inverse, slot_mapping % sb, reduce="amax")
    kmin, kmax, kmean = summaries
    keys = k_cache.view(-1, sb, hkv, d)[touched].to(kmin.dtype)  # [U, sb, Hkv, D], fp8 pages upcast
    valid = (torch.arange(sb, device=keys.device)[None, :] <= last_row[:, None])[:, :, None, None]
    inf = torch.tensor(float("inf"), dtype=keys.dtype, device=keys.device)
    kmin.view(-1, hkv, d)[touched] = torch.where(valid, keys, inf).amin(dim=1)
    kmax.view(-1, hkv, d)[touched] = torch.where(valid, keys, -inf).amax(dim=1)
    total = torch.where(valid, keys.float(), 0).sum(dim=1)
    kmean.view(-1, hkv, d)[touched] = (total / (last_row + 1)[:, None, None]).to(kmean.dtype)
