"""Per-page key summaries for sparse attention: per-channel min, max and mean of the RoPE'd keys.

Each logical page (`summary_block` tokens) of each KV head keeps kmin/kmax over its keys, which bounds
q.k for every key inside the page (Quest), and kmean, whose q.kmean is the page's mean logit (ShadowKV's
landmarks; a sharper ranking than the bound on small models, see QUALITY.md). A write touches a few
logical pages; each touched one is recomputed from the keys just stored, over rows block_start..last
row written. Recomputing rather than accumulating keeps the summary exact when a freed page is reused by
another sequence, and when rows are rewritten (speculative decoding rollback): rows past the last
written one are not yet part of the sequence, so they are ignored.
"""

from __future__ import annotations

import torch

from kvcache.pool import KVPool


def update_summaries(pool: KVPool, layer: int, slot_mapping: torch.Tensor) -> None:
    """Refresh the summaries of every logical page that `slot_mapping` wrote to in `layer` (after write)."""
    if pool.kmin is None or pool.kmax is None or pool.kmean is None or slot_mapping.numel() == 0:
        return
    sb = pool.spec.summary_block
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    block = slot_mapping // sb  # flat logical-page id (pages are whole multiples of summary_block)
    row = slot_mapping % sb
    touched, inverse = torch.unique(block, return_inverse=True)
    last_row = torch.full_like(touched, -1).scatter_reduce_(0, inverse, row, reduce="amax")
    keys = pool.k[layer].view(-1, sb, hkv, d)[touched]  # [U, sb, Hkv, D]
    valid = (torch.arange(sb, device=keys.device)[None, :] <= last_row[:, None])[:, :, None, None]
    inf = torch.tensor(float("inf"), dtype=keys.dtype, device=keys.device)
    pool.kmin[layer].view(-1, hkv, d)[touched] = torch.where(valid, keys, inf).amin(dim=1)
    pool.kmax[layer].view(-1, hkv, d)[touched] = torch.where(valid, keys, -inf).amax(dim=1)
    pool.kmean[layer].view(-1, hkv, d)[touched] = (torch.where(valid, keys, 0).sum(dim=1)
                                                   / (last_row + 1).to(keys.dtype)[:, None, None])
