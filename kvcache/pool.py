"""The page pool: preallocated K/V pages for every layer, plus optional per-page key summaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    summary_tokens: int = 16  # tokens per summary summarised by key min/max/mean
    dtype: torch.dtype = torch.float32  # the model's: key summaries, and K/V unless kv_dtype says
    kv_dtype: torch.dtype | None = None  # the K/V pages' own dtype (fp8 KV: --kv-cache-dtype fp8)

    @property
    def page_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    def bytes_per_page(self, with_summaries: bool) -> int:
        kv = 2 * self.value_bytes_per_page(self.num_layers)
        if not with_summaries:
            return kv
        blocks = self.page_size // self.summary_tokens
        elem = self.dtype.itemsize
        return kv + 3 * self.num_layers * blocks * self.num_kv_heads * self.head_dim * elem

    def value_bytes_per_page(self, num_layers: int) -> int:
        """Bytes of one page's values in `num_layers` layers."""
        return num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.page_dtype.itemsize


class KVPool:
    """All pages of all layers in two tensors, so a page id means the same slot in every layer.

    With `value_slots` (value offload), layer offloaded_from + i keeps only value_slots[i] value slots,
    which value_tiers.py hands out: `v` is then a list of per-layer tensors (v[layer] either way).
    """

    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device, with_summaries: bool,
                 value_slots: list[int] | None = None, offloaded_from: int = 0):
        if spec.page_size % spec.summary_tokens:
            raise ValueError(f"page_size {spec.page_size} must be a multiple of {spec.summary_tokens}")
        self.spec = spec
        self.num_pages = num_pages
        self.device = device
        shape = (spec.num_layers, num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.page_dtype, device=device)
        self.v: torch.Tensor | list[torch.Tensor] = torch.zeros(shape, dtype=spec.page_dtype, device=device) \
            if value_slots is None else \
            [torch.zeros((rows, *shape[2:]), dtype=spec.page_dtype, device=device)
             for rows in [num_pages] * offloaded_from + list(value_slots)]
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.kmean: torch.Tensor | None = None
        if with_summaries:
            sshape = (spec.num_layers, num_pages, spec.page_size // spec.summary_tokens,
                      spec.num_kv_heads, spec.head_dim)
            self.kmin = torch.full(sshape, float("inf"), dtype=spec.dtype, device=device)
            self.kmax = torch.full(sshape, float("-inf"), dtype=spec.dtype, device=device)
            self.kmean = torch.zeros(sshape, dtype=spec.dtype, device=device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.spec.page_size

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, device: torch.device,
                    with_summaries: bool) -> KVPool:
        num_pages = budget_bytes // spec.bytes_per_page(with_summaries)
        if num_pages < 2:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds fewer than 2 pages")
        return cls(spec, int(num_pages), device, with_summaries)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              value_slot_mapping: torch.Tensor | None = None) -> None:
        """Scatter the step's new keys/values ([T, Hkv, D]) into their slots (values into their value
        slots where those differ: offloaded layers, see value_tiers.py)."""
        hkv, d = self.spec.num_kv_heads, self.spec.head_dim
        value_slots = slot_mapping if value_slot_mapping is None else value_slot_mapping
        store(self.k[layer].view(-1, hkv, d), slot_mapping, k)
        store(self.v[layer].view(-1, hkv, d), value_slots, v)


def to_page_dtype(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows in the pages' dtype; into fp8 saturating at its largest value (a cast past e4m3's 448 gives
    NaN, and one outlier key would then poison every score of its page)."""
    if dtype.itemsize == 1 and dtype.is_floating_point:
        bound = torch.finfo(dtype).max
        rows = rows.clamp(-bound, bound)
    return rows.to(dtype)


def store(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slots] = rows in the cache's dtype. torch has no index_copy_ for fp8, so one-byte caches
    are written through a uint8 view of the same bytes."""
    rows = to_page_dtype(rows, cache.dtype)
    if cache.element_size() == 1:
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.index_copy_(0, slots, rows)
