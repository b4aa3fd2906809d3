"""The contract between the model and its attention backends, and the words they share.

Words (one per idea, used the same way in kvcache/):
    page        `page_size` consecutive tokens of one sequence's KV: the unit the allocator hands out.
    page table  a sequence's pages in position order; token p lives in page_table[p // page_size],
                row p % page_size, at flat slot page * page_size + row.
    summary     per `summary_tokens` tokens (a page holds page_size // summary_tokens of them) and KV
                head: the keys' min, max and mean, which page selection scores instead of the keys.
    unit        what a selection policy picks: `unit_tokens` consecutive positions (a multiple of
                summary_tokens). Sink units and the newest units are always read.
    streaming head  a KV head that reads only the attention sinks and a local window (StreamingLLM);
    retrieval head  a KV head that reads the units its policy picks.
    ("SSE" is the HTTP event stream, in server/; the selection policy that ignores the query and
    reads the newest units is called `recent`.)

KV cache layout (one tensor pair for all layers, see kvcache/pool.py):
    k, v:               [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    kmin, kmax, kmean:  [num_layers, num_pages, page_size // summary_tokens, num_kv_heads, head_dim]
                        (only when the pool keeps summaries, i.e. sparse attention is on)

A step's new tokens of all sequences are flattened into one [T, ...] batch; sequence i owns rows
query_start_loc[i]:query_start_loc[i+1], which are its last query_lens[i] positions.

    verify      a decoding sequence's speculative step: its newest token plus num_draft_tokens[i] drafts,
                query_lens[i] = 1 + num_draft_tokens[i]. Each row is a decode query at its own position
                (causal among the rows), not a prefill chunk.

This package may import kvcache/ only.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Everything a backend needs for one step; built once per step (`build`), shared by all layers."""

    seq_ids: list[int]  # stable ids (a sparse backend keys its per-sequence state on them)
    query_lens: list[int]
    context_lens: list[int]  # tokens in the cache for each sequence after this step's write
    query_start_loc: torch.Tensor  # [B + 1] int64, on device
    context_lens_t: torch.Tensor  # [B] int32, on device
    page_tables: torch.Tensor  # [B, max_pages] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64 flat slot of each new token
    positions: torch.Tensor  # [T] int64
    # Per-sequence attention choice: "dense" or "sparse", and the sparse token budget (0: the default).
    modes: list[str]
    token_budgets: list[int]
    num_draft_tokens: list[int] = field(default_factory=list)  # per sequence; empty: no speculation
    # Offloaded values (kvcache/value_tiers.py): from layer `value_layers_from` on, values are not at a
    # page's own slot but at the device value slot value_tables[i][j] of page j (-1: on the host).
    value_tables: torch.Tensor | None = None  # [B, max_pages] int32, like page_tables
    value_slot_mapping: torch.Tensor | None = None  # [T] int64 value slot of each new token
    value_layers_from: int = 0
    # What a backend derives from this step's metadata once and every layer reuses (cpu_decode's
    # PagedRows, keyed by the backend): filled on first use, dropped with the metadata.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, seq_ids: list[int], query_lens: list[int], context_lens: list[int],
              page_tables: list[list[int]], page_size: int, device: torch.device | str,
              modes: list[str] | None = None, token_budgets: list[int] | None = None,
              num_draft_tokens: list[int] | None = None, value_tables: list[list[int]] | None = None,
              value_layers_from: int = 0) -> AttentionMetadata:
        """The one constructor: sequence i brings its last query_lens[i] of context_lens[i] positions."""
        positions = [pos for n, ctx in zip(query_lens, context_lens, strict=True)
                     for pos in range(ctx - n, ctx)]
        width = max(len(t) for t in page_tables)

        def slots_and_padded(tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            slots = [table[pos // page_size] * page_size + pos % page_size
                     for n, ctx, table in zip(query_lens, context_lens, tables, strict=True)
                     for pos in range(ctx - n, ctx)]
            padded = [t + [0] * (width - len(t)) for t in tables]
            return (torch.tensor(slots, dtype=torch.int64, device=device),
                    torch.tensor(padded, dtype=torch.int32, device=device))

        slot_mapping, padded = slots_and_padded(page_tables)
        value_slots, value_padded = (None, None) if value_tables is None else slots_and_padded(value_tables)
        b = len(seq_ids)
        return cls(
            seq_ids=list(seq_ids), query_lens=list(query_lens), context_lens=list(context_lens),
            query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int64,
                                         device=device),
            context_lens_t=torch.tensor(context_lens, dtype=torch.int32, device=device),
            page_tables=padded, slot_mapping=slot_mapping,
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            modes=list(modes) if modes is not None else ["sparse"] * b,
            token_budgets=list(token_budgets) if token_budgets is not None else [0] * b,
            num_draft_tokens=list(num_draft_tokens) if num_draft_tokens and any(num_draft_tokens) else [],
            value_tables=value_padded, value_slot_mapping=value_slots, value_layers_from=value_layers_from)

    def values_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page tables, slot mapping) through which `layer` reads and writes values."""
        if self.value_tables is None or self.value_slot_mapping is None or layer < self.value_layers_from:
            return self.page_tables, self.slot_mapping
        return self.value_tables, self.value_slot_mapping

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def is_verify(self, i: int) -> bool:
        """Sequence i verifies drafts this step: its rows are decode queries, not a prefill chunk."""
        return bool(self.num_draft_tokens) and self.num_draft_tokens[i] > 0

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (the hot path)."""
        return all(n == 1 for n in self.query_lens)

    def decodes(self, i: int) -> bool:
        """Sequence i's rows are decode queries: one new token, or a verify."""
        return self.query_lens[i] == 1 or self.is_verify(i)

    @property
    def decodes_only(self) -> bool:
        """No prefill chunk in the step: one decode kernel launch serves every sequence."""
        return all(self.decodes(i) for i in range(self.num_seqs))

    @property
    def uniform_query_len(self) -> int | None:
        """The query length every sequence of a decode/verify step shares (a CUDA graph's shape), or
        None when the step has prefill chunks or verifies of several lengths."""
        lens = set(self.query_lens)
        return lens.pop() if len(lens) == 1 and self.decodes_only else None

    def decode_kernel_args(self) -> dict:
        """What a decode kernel needs beyond the batch to run a verify step (nothing for plain decode)."""
        if self.is_decode:
            return {}
        return {"query_start_loc": self.query_start_loc, "max_query_len": max(self.query_lens)}

    def rows_of(self, index: list[int]) -> torch.Tensor:
        """The flattened token rows of the sequences at batch positions `index`."""
        starts = self.query_start_loc.tolist()
        rows = [torch.arange(starts[i], starts[i + 1]) for i in index]
        return torch.cat(rows).to(self.query_start_loc.device)

    def subset(self, index: list[int]) -> AttentionMetadata:
        """The metadata of some of the step's sequences (e.g. the ones a sparse backend runs dense)."""
        lens = [self.query_lens[i] for i in index]
        rows = self.rows_of(index)
        dev = self.query_start_loc.device
        return AttentionMetadata(
            seq_ids=[self.seq_ids[i] for i in index], query_lens=lens,
            context_lens=[self.context_lens[i] for i in index],
            query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64, device=dev),
            context_lens_t=self.context_lens_t[index], page_tables=self.page_tables[index],
            slot_mapping=self.slot_mapping[rows], positions=self.positions[rows],
            modes=[self.modes[i] for i in index], token_budgets=[self.token_budgets[i] for i in index],
            num_draft_tokens=[self.num_draft_tokens[i] for i in index] if self.num_draft_tokens else [],
            value_tables=None if self.value_tables is None else self.value_tables[index],
            value_slot_mapping=None if self.value_slot_mapping is None else self.value_slot_mapping[rows],
            value_layers_from=self.value_layers_from)

    def padded(self, num_seqs: int, **tensors: torch.Tensor) -> AttentionMetadata:
        """A decode or verify step's metadata padded to `num_seqs` sequences (a CUDA-graph bucket) of
        the step's one query length: padded sequences have seq id -1 and context 0; the tensors are the
        caller's (static, already padded) buffers."""
        pad = num_seqs - self.num_seqs
        n = self.query_lens[0]
        return dataclasses.replace(
            self, seq_ids=self.seq_ids + [-1] * pad, query_lens=self.query_lens + [n] * pad,
            context_lens=self.context_lens + [0] * pad, modes=self.modes + self.modes[-1:] * pad,
            token_budgets=self.token_budgets + self.token_budgets[-1:] * pad,
            num_draft_tokens=self.num_draft_tokens + [n - 1] * pad if self.num_draft_tokens else [],
            derived={}, **tensors)


@dataclass
class AttentionStats:
    """Telemetry a backend gathered since its last drain (a dense backend leaves it empty)."""

    recall_samples: list[float] = field(default_factory=list)  # attention mass kept, on sampled steps
    tokens_read: list[int] = field(default_factory=list)  # per decoding sequence and step
    dense_fallbacks: int = 0  # sequences in sparse mode that ran dense
    guard_widenings: int = 0  # budgets the fidelity guard widened (recall under --sparse-min-recall)
    drift_reselections: int = 0  # reselections per layer and sequence a query's drift caused (--sparse-drift)


class AttentionBackend:
    """Writes the step's K/V into the paged cache, then attends. One instance serves all layers.

    Besides `forward`, a backend answers the engine's hooks; the defaults here suit a stateless
    backend that runs every step eagerly.
    """

    name: str

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, window: int | None = None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (RoPE applied) -> [T, Hq, D].

        `window` (a sliding-window layer's, None for global layers): a query at position p reads only
        keys at positions > p - window, in every attention mode."""
        raise NotImplementedError

    def kv_key(self, mode: str, budget: int) -> str:
        """What a sequence's KV depends on beyond its tokens (salts its prefix-cache hashes)."""
        return mode

    def begin_step(self, meta: AttentionMetadata) -> None:
        """Called once before layer 0 of each step."""

    def release(self, seq_id: int) -> None:
        """Called when a sequence leaves the batch (finished, aborted or preempted)."""

    def rollback(self, seq_id: int, rejected: int) -> None:
        """The sequence's last verify step kept all but its last `rejected` rows."""

    def draft_limit(self, seq_id: int, budget: int, context: int) -> int | None:
        """The most drafts the sequence may verify next step with its output unchanged (None: any)."""
        return None

    def reserve(self, max_batch: int) -> None:
        """Allocate, before CUDA graphs are captured, every buffer a graph will read: it must not move."""

    def graph_key(self, meta: AttentionMetadata) -> object | None:
        """The CUDA graph this decode step can replay (steps with equal keys share one), or None to run
        the step eagerly."""
        return None

    def drain_stats(self) -> AttentionStats:
        """Telemetry since the last call (the engine calls this once per step)."""
        return AttentionStats()
