"""Builds one step's flattened inputs and attention metadata, runs the model, returns logits.

Only sequences that reach their last token this step (decodes and final prefill chunks) get logits.
"""

from __future__ import annotations

import os

import torch

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.models.llama import LlamaForCausalLM
from needle.scheduler.scheduler import Batch
from needle.scheduler.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device, default_mode: str, default_budget: int):
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.default_mode = default_mode
        self.default_budget = default_budget
        self.graphs = None
        # the Triton kernels have no sliding window: windowed models (Mistral, Gemma 3) stay on torch
        triton = os.environ.get("NEEDLE_TRITON", "1") != "0" and not model.config.windowed
        if device.type == "cuda" and triton:
            from needle.attention.kernels import HAS_TRITON

            if HAS_TRITON:  # Triton kernels + CUDA graphs for decode; the torch backends stay the CPU path
                from needle.attention.triton_backend import use_triton
                from needle.engine.cuda_graph import CudaGraphRunner

                self.backend = use_triton(backend)
                if os.environ.get("NEEDLE_CUDA_GRAPHS", "1") != "0":
                    self.graphs = CudaGraphRunner(model, self.backend, device)

    def build_metadata(self, batch: Batch) -> tuple[torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            table = seq.pages.block_table
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // self.page_size] * self.page_size + pos % self.page_size)
            context_lens.append(start + n)
        width = max(len(s.pages.block_table) for s in batch.seqs)
        tables = [s.pages.block_table + [0] * (width - len(s.pages.block_table)) for s in batch.seqs]
        starts = [0]
        for n in batch.num_new_tokens:
            starts.append(starts[-1] + n)
        dev = self.device
        meta = AttentionMetadata(
            seq_ids=[s.seq_id for s in batch.seqs],
            query_lens=list(batch.num_new_tokens),
            context_lens=context_lens,
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=dev),
            context_lens_t=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            modes=[self._mode(s) for s in batch.seqs],
            token_budgets=[self._budget(s) for s in batch.seqs],
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), meta

    @torch.inference_mode()
    def execute(self, batch: Batch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """-> (logits [S, V] float32 for the sequences that emit a token, those sequences)."""
        input_ids, meta = self.build_metadata(batch)
        self.backend.begin_step(meta)
        hidden = self.graphs.run(input_ids, meta) if self.graphs is not None else None
        if hidden is None:
            hidden = self.model(input_ids, self.backend, meta)
        rows, emitting = [], []
        ends = meta.query_start_loc.tolist()[1:]
        for seq, n, end in zip(batch.seqs, batch.num_new_tokens, ends, strict=True):
            if seq.num_computed + n == len(seq):
                rows.append(end - 1)
                emitting.append(seq)
        if not rows:
            return None, []
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)]), emitting

    def attention_key(self, seq: Sequence) -> str:
        """What the sequence's KV depends on beyond its tokens: its attention mode (and sparse budget)."""
        return self.backend.kv_key(self._mode(seq), self._budget(seq))

    def _mode(self, seq: Sequence) -> str:
        override = seq.params.attention
        return override.mode if override and override.mode else self.default_mode

    def _budget(self, seq: Sequence) -> int:
        override = seq.params.attention
        return override.token_budget if override and override.token_budget else self.default_budget
