"""`draft_model`: a second, smaller model with the target's tokenizer drafts greedily, with its own
page pool, allocator and dense attention.

Per target sequence it keeps the token ids whose KV its cache holds. To propose k tokens it first
catches up: it keeps the longest prefix those ids share with the sequence's current tokens (drafts the
target rejected fall away, pages past it are freed) and runs the rest of the sequence in one chunk,
whose last row gives draft 0; then k - 1 single-token rounds. A sequence whose draft pages do not fit
gets no drafts this step (it decodes plainly). Drafts are argmax: q is one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend
from needle.engine.loader import ModelLoadError, load_config, load_model, resolve_model
from needle.engine.spec_decode.drafter import Draft
from needle.kvcache.page_allocator import PageAllocator, SeqPages
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.scheduler.sequence import Sequence


@dataclass
class _DraftSeq:
    seq_id: int
    pages: SeqPages = field(default_factory=SeqPages)
    cached: list[int] = field(default_factory=list)  # tokens whose KV the draft pool holds


class DraftModelDrafter:
    name = "draft_model"

    def __init__(self, model: str | None, load_format: str, dtype: torch.dtype, device: torch.device,
                 page_size: int, kv_bytes: int, vocab_size: int):
        path, name = resolve_model(model, load_format)
        cfg = load_config(path, name)
        if cfg.vocab_size != vocab_size:
            raise ModelLoadError(f"draft model {name!r} has a vocabulary of {cfg.vocab_size} tokens, the "
                                 f"target {vocab_size}: speculation needs the same tokenizer")
        self.model = load_model(path, cfg, dtype, device, load_format, 0)
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, dtype=dtype)
        self.pool = KVPool.from_budget(spec, kv_bytes, device, with_summaries=False)
        self.backend = DenseBackend(self.pool)
        self.allocator = PageAllocator(self.pool.num_pages, page_size, enable_prefix_caching=False)
        self.page_size, self.device = page_size, device
        self.seqs: dict[int, _DraftSeq] = {}

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts: list[list[int]] = [[] for _ in seqs]
        states = [self._catch_up(s, k) for s, k in zip(seqs, ks, strict=True)]
        live = [i for i, st in enumerate(states) if st is not None]
        for j in range(max((ks[i] for i in live), default=0)):
            index = [i for i in live if ks[i] > j]
            if j == 0:
                query = [seqs[i].token_ids[len(states[i].cached):] for i in index]
            else:
                query = [[drafts[i][-1]] for i in index]
            for i, q in zip(index, query, strict=True):
                states[i].cached.extend(q)
            meta = AttentionMetadata.build(
                seq_ids=[seqs[i].seq_id for i in index], query_lens=[len(q) for q in query],
                context_lens=[len(states[i].cached) for i in index],
                page_tables=[states[i].pages.page_table for i in index], page_size=self.page_size,
                device=self.device, modes=["dense"] * len(index))
            ids = torch.tensor([t for q in query for t in q], dtype=torch.int64, device=self.device)
            hidden = self.model(ids, self.backend, meta)
            last = meta.query_start_loc[1:] - 1
            for i, token in zip(index, self.model.logits(hidden[last]).argmax(-1).tolist(), strict=True):
                drafts[i].append(token)
        return [Draft(d) for d in drafts]

    def _catch_up(self, seq: Sequence, k: int) -> _DraftSeq | None:
        """The sequence's draft state with room for its tokens + k drafts, the cache trimmed to what is
        still its prefix; None when the draft pool is full (the state is dropped)."""
        st = self.seqs.setdefault(seq.seq_id, _DraftSeq(seq.seq_id))
        tokens = seq.token_ids
        # Committed tokens never change, so only the tail (drafts, at most K of them) can differ.
        common = max(0, len(st.cached) - 32)
        limit = min(len(st.cached), len(tokens) - 1)  # the newest token always runs: it gives draft 0
        while common < limit and st.cached[common] == tokens[common]:
            common += 1
        del st.cached[common:]
        self.allocator.truncate(st.pages, common)
        need = len(tokens) + k - 1
        if not self.allocator.can_grow(st.pages, need):
            self.release(seq.seq_id)
            return None
        self.allocator.grow(st.pages, need)
        return st

    def release(self, seq_id: int) -> None:
        st = self.seqs.pop(seq_id, None)
        if st is not None and st.pages.page_table:
            self.allocator.release(st.pages)
