"""Dense attention over the paged cache in plain torch: the CPU path and the reference for kernels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.attention.cpu_decode import MAX_GROUP, PagedRows, in_place_decode, paged_decode, write_kv
from needle.kvcache.pool import KVPool


def gather_seq_kv(pool: KVPool, layer: int, page_table: torch.Tensor, ctx_len: int,
                  value_table: torch.Tensor | None = None):
    """K and V of one sequence's first ctx_len tokens, contiguous: ([ctx, Hkv, D], [ctx, Hkv, D]).
    Values are read through value_table where they are not at the pages' own slots (offload)."""
    n_pages = -(-ctx_len // pool.spec.page_size)
    pages = page_table[:n_pages].long()
    value_pages = pages if value_table is None else value_table[:n_pages].long()
    shape = (-1, pool.spec.num_kv_heads, pool.spec.head_dim)
    k = pool.k[layer].index_select(0, pages).reshape(shape)[:ctx_len]
    v = pool.v[layer].index_select(0, value_pages).reshape(shape)[:ctx_len]
    return k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False) -> torch.Tensor:
    """Grouped-query SDPA on token-major tensors: q [..., Tq, Hq, D], k/v [..., Tk, Hkv, D] -> like q.

    Inputs go in as 4-D views: with 3-D ones, the CPU build falls back to the O(T^2)-memory math kernel.
    """
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(
        q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
        attn_mask=mask, is_causal=causal, enable_gqa=q.shape[-2] != k.shape[-2])
    out = out.transpose(-3, -2)
    return out[0] if unbatched else out


def causal_chunk_mask(num_q: int, ctx_len: int, device: torch.device, window: int | None = None,
                      first_key: int = 0) -> torch.Tensor:
    """[Tq, ctx - first_key] mask for the last num_q positions of a ctx_len context, over keys from
    first_key on: query i sees keys <= its position (and, with a window, > its position - window)."""
    q_pos = torch.arange(ctx_len - num_q, ctx_len, device=device)[:, None]
    k_pos = torch.arange(first_key, ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    return mask if window is None else mask & (k_pos > q_pos - window)


class DenseBackend(AttentionBackend):
    name = "dense"

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.in_place = in_place_decode(pool.k)  # decode reads the pages where they lie (cpu_decode.py)

    def reads_in_place(self, group: int) -> bool:
        """Decode rows of `group` query heads per KV head go through the in-place CPU kernel."""
        return self.in_place and group <= MAX_GROUP

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        write_kv(self.pool, layer, k, v, meta.slot_mapping, meta.values_of(layer)[1])
        return self.attend(layer, q, meta, window)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
               window: int | None = None) -> torch.Tensor:
        """Attention over the cache, whose K/V for this step are already written. With the in-place
        kernel, decode and verify rows read the pages where they lie, also beside prefill chunks."""
        in_place = self.reads_in_place(q.shape[1] // self.pool.spec.num_kv_heads)
        if in_place and meta.decodes_only:
            return self.decode_in_place(layer, q, meta, window)
        if meta.is_decode:
            if window is None:
                return self.decode(layer, q, meta)
            return self.decode_window(layer, q, meta, window)
        out = torch.empty_like(q)
        decoding = [i for i in range(meta.num_seqs) if meta.decodes(i)] if in_place else []
        if decoding:
            rows = meta.rows_of(decoding)
            out[rows] = self.decode_in_place(layer, q[rows], meta.subset(decoding), window)
        starts = meta.query_start_loc.tolist()
        value_tables = meta.values_of(layer)[0]
        for i, ctx in enumerate(meta.context_lens):
            if i in decoding:
                continue
            rows = slice(starts[i], starts[i + 1])
            out[rows] = self.prefill_one(layer, q[rows], meta.page_tables[i], ctx, window, value_tables[i])
        return out

    def prefill_one(self, layer: int, q: torch.Tensor, page_table: torch.Tensor, ctx: int,
                    window: int | None = None, value_table: torch.Tensor | None = None) -> torch.Tensor:
        num_q = q.shape[0]
        # a windowed layer gathers only the keys its oldest query can see
        first = 0 if window is None else max(0, ctx - num_q - window + 1)
        first_page = first // self.pool.spec.page_size
        first_key = first_page * self.pool.spec.page_size
        values = None if value_table is None else value_table[first_page:]
        k, v = gather_seq_kv(self.pool, layer, page_table[first_page:], ctx - first_key, values)
        if num_q == ctx and window is None:
            return attend(q, k.to(q.dtype), v.to(q.dtype), causal=True)
        mask = causal_chunk_mask(num_q, ctx, q.device, window, first_key)
        return attend(q, k.to(q.dtype), v.to(q.dtype), mask=mask)

    def decode_in_place(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
                        window: int | None = None) -> torch.Tensor:
        """A decode or verify step without copying the context: each query row (a verify's too) reads
        the positions up to its own straight from the pages (the last `window` of them, windowed)."""
        spec = self.pool.spec
        rows = q.view(q.shape[0], spec.num_kv_heads, -1, spec.head_dim)
        reads = self.paged_rows(layer, meta, window)
        scale = 1.0 / math.sqrt(spec.head_dim)
        out, _ = paged_decode(rows, self.pool.k[layer], self.pool.v[layer], reads, scale, with_lse=False)
        return out.view_as(q)

    def paged_rows(self, layer: int, meta: AttentionMetadata, window: int | None) -> PagedRows:
        """What each query row reads, built once per step for the layers that share the window and the
        value tables."""
        value_tables = meta.values_of(layer)[0]
        key = ("dense", window, value_tables is meta.page_tables)
        if (rows := meta.derived.get(key)) is not None:
            return rows
        if meta.is_decode:
            tables, lengths = meta.page_tables, meta.context_lens_t
        else:
            seq = [i for i, n in enumerate(meta.query_lens) for _ in range(n)]
            index = torch.tensor(seq, device=meta.page_tables.device)
            lengths = torch.tensor([meta.context_lens[i] - n + 1 + j for i, n in enumerate(meta.query_lens)
                                    for j in range(n)], device=index.device)
            tables, value_tables = meta.page_tables[index], value_tables[index]
        starts = None if window is None else (lengths.long() - window).clamp(min=0)
        rows = meta.derived[key] = PagedRows.dense(tables, value_tables, lengths, starts)
        return rows

    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """All sequences at once: gather their pages into a padded [B, L] batch and mask the tail."""
        spec = self.pool.spec
        max_ctx = max(meta.context_lens)
        n_pages = -(-max_ctx // spec.page_size)
        tables = meta.page_tables[:, :n_pages].long()
        value_tables = meta.values_of(layer)[0][:, :n_pages].long()
        b = tables.shape[0]
        k = self.pool.k[layer][tables].reshape(b, -1, spec.num_kv_heads, spec.head_dim)[:, :max_ctx]
        v = self.pool.v[layer][value_tables].reshape(b, -1, spec.num_kv_heads, spec.head_dim)[:, :max_ctx]
        valid = torch.arange(max_ctx, device=q.device)[None, :] < meta.context_lens_t[:, None]
        out = attend(q[:, None], k.to(q.dtype), v.to(q.dtype), mask=valid[:, None, None, :])
        return out[:, 0]

    def decode_window(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
                      window: int) -> torch.Tensor:
        """A sliding-window layer's decode: each sequence reads only its last `window` positions, so the
        pages before the window are never touched."""
        spec = self.pool.spec
        span = min(window, max(meta.context_lens))
        pos = meta.context_lens_t.long()[:, None] - span + torch.arange(span, device=q.device)
        valid = pos >= 0
        pos = pos.clamp(min=0)
        pages = meta.page_tables.long().gather(1, pos // spec.page_size)
        slots = pages * spec.page_size + pos % spec.page_size
        k = self.pool.k[layer].view(-1, spec.num_kv_heads, spec.head_dim)[slots]
        v = self.pool.v[layer].view(-1, spec.num_kv_heads, spec.head_dim)[slots]
        out = attend(q[:, None], k.to(q.dtype), v.to(q.dtype), mask=valid[:, None, None, :])
        return out[:, 0]
