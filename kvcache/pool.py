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
    dtype: torch.dtype = torch.float32

    def bytes_per_page(self, with_summaries: bool) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        kv = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem
        if not with_summaries:
            return kv
        blocks = self.page_size // self.summary_tokens
        return kv + 3 * self.num_layers * blocks * self.num_kv_heads * self.head_dim * elem

    def value_bytes_per_page(self, num_layers: int) -> int:
        """Bytes of one page's values in `num_layers` layers."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem


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
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v: torch.Tensor | list[torch.Tensor] = torch.zeros(shape, dtype=spec.dtype, device=device) \
            if value_slots is None else \
            [torch.zeros((rows, *shape[2:]), dtype=spec.dtype, device=device)
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
        self.k[layer].view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(self.spec.dtype))
        self.v[layer].view(-1, hkv, d).index_copy_(0, value_slots, v.to(self.spec.dtype))
