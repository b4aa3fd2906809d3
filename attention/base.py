"""The contract between the model and its attention backends.

KV cache layout (one tensor pair for all layers, see kvcache/pool.py):
    k, v:        [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    kmin, kmax:  [num_layers, num_pages, page_size // summary_block, num_kv_heads, head_dim]
                 (only when the pool keeps key summaries, i.e. sparse attention is on)
A token at position p of a sequence lives in page block_table[p // page_size], row p % page_size;
its flat slot is page * page_size + row.

A step's new tokens of all sequences are flattened into one [T, ...] batch; sequence i owns rows
query_start_loc[i]:query_start_loc[i+1], which are its last query_lens[i] positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything a backend needs for one step; built once per step by the runner, shared by all layers."""

    seq_ids: list[int]  # stable ids (a sparse backend keys its per-sequence state on them)
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache for each sequence after this step's write
    query_start_loc: torch.Tensor  # [B + 1] int64, on device
    context_lens_t: torch.Tensor  # [B] int32, on device
    block_tables: torch.Tensor  # [B, max_pages] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64 flat slot of each new token
    positions: torch.Tensor  # [T] int64
    # Per-sequence attention choice: "dense" or "sparse", and the sparse token budget.
    modes: list[str]
    token_budgets: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (the hot path)."""
        return all(n == 1 for n in self.query_lens)


class AttentionBackend(ABC):
    """Writes the step's K/V into the paged cache, then attends. One instance serves all layers."""

    name: str

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (RoPE applied) -> [T, Hq, D].

        `window` (a sliding-window layer's, None for global layers): a query at position p reads only
        keys at positions > p - window, in every attention mode."""

    def kv_key(self, mode: str, budget: int) -> str:
        """What a sequence's KV depends on beyond its tokens (salts its prefix-cache hashes)."""
        return mode

    def begin_step(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called once before layer 0 of each step."""

    def release(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        """Called when a sequence leaves the batch (finished, aborted or preempted)."""
