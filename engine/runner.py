"""Builds one step's flattened inputs and attention metadata, runs the model, returns logits.

Only sequences that reach their last token this step (decodes and final prefill chunks) get logits;
a verifying sequence (speculative decoding) gets one row per verified position: its newest token's and
each draft's. A sequence that asked for prompt logprobs also hands back the hidden states of its
prefill positions (`PromptRows`), from which engine/prompt_logprobs.py takes them.
"""

from __future__ import annotations

import torch

from needle.attention.base import AttentionBackend, AttentionMetadata
from needle.engine.cuda_graph import CudaGraphRunner
from needle.engine.distributed import RankLost, Step, TensorParallel
from needle.engine.models.llama import LlamaForCausalLM
from needle.engine.prompt_logprobs import PromptRows, prompt_rows
from needle.kvcache.summaries import update_summaries
from needle.kvcache.value_tiers import ValueTiers
from needle.scheduler.scheduler import Batch
from needle.scheduler.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device, default_mode: str, default_budget: int,
                 graphs: CudaGraphRunner | None = None, tiers: ValueTiers | None = None,
                 ranks: TensorParallel | None = None):
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.default_mode = default_mode
        self.default_budget = default_budget
        self.graphs = graphs  # CUDA graphs for decode steps, or None to run every step eagerly
        self.tiers = tiers  # where offloaded values sit, or None
        self.ranks = ranks  # tensor parallelism's processes, or None for one process

    def set_backend(self, backend: AttentionBackend) -> None:
        self.backend = backend
        if self.graphs is not None:
            self.graphs = CudaGraphRunner(self.model, backend, self.device, self.graphs.buckets[-1],
                                          self.graphs.max_query_len)

    def step_of(self, batch: Batch) -> Step:
        """The step as plain lists: what the model and the backend read, and what rank 0 sends the other
        tensor-parallel ranks."""
        ids: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n - len(seq.draft_ids)])
            ids.extend(seq.draft_ids)
        return Step(ids, dict(
            seq_ids=[s.seq_id for s in batch.seqs], query_lens=list(batch.num_new_tokens),
            context_lens=[s.num_computed + n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)],
            page_tables=[s.pages.page_table for s in batch.seqs], modes=[self._mode(s) for s in batch.seqs],
            token_budgets=[self._budget(s) for s in batch.seqs],
            num_draft_tokens=[len(s.draft_ids) for s in batch.seqs]))

    def tensors(self, step: Step, value_tables: list[list[int]] | None = None
                ) -> tuple[torch.Tensor, AttentionMetadata]:
        meta = AttentionMetadata.build(**step.metadata, page_size=self.page_size, device=self.device,
                                       value_tables=value_tables,
                                       value_layers_from=0 if self.tiers is None else self.tiers.first_layer)
        return torch.tensor(step.input_ids, dtype=torch.int64, device=self.device), meta

    @torch.inference_mode()
    def execute(self, batch: Batch) -> tuple[torch.Tensor | None, list[Sequence], list[PromptRows]]:
        """-> (logits float32 for the sequences that emit a token, 1 + len(draft_ids) rows each, those
        sequences, the prompt rows of sequences that asked for prompt logprobs)."""
        hidden, meta = self.run(self.step_of(batch), None if self.tiers is None else
                                [self.tiers.value_table(s.pages.page_table) for s in batch.seqs])
        rows, emitting, prompt = [], [], []
        ends = meta.query_start_loc.tolist()[1:]
        for seq, n, end in zip(batch.seqs, batch.num_new_tokens, ends, strict=True):
            if (found := prompt_rows(seq, n, hidden[end - n:end])) is not None:
                prompt.append(found)
            if seq.num_computed + n - len(seq.draft_ids) == len(seq):
                rows.extend(range(end - 1 - len(seq.draft_ids), end))
                emitting.append(seq)
        if not rows:
            return None, [], prompt
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)]), emitting, prompt

    def run(self, step: Step, value_tables: list[list[int]] | None = None
            ) -> tuple[torch.Tensor, AttentionMetadata]:
        """-> (final hidden states, metadata) of one step. With tensor parallelism (this is rank 0) the step
        goes to the other ranks first; any failure then leaves the ranks out of lockstep: RankLost."""
        input_ids, meta = self.tensors(step, value_tables)
        if self.ranks is None:
            return self.forward(input_ids, meta), meta
        try:
            self.ranks.check_alive()
            self.ranks.send(step)
            return self.forward(input_ids, meta), meta
        except RankLost:
            raise
        except Exception as err:
            raise self.ranks.lost(err) from err

    @torch.inference_mode()
    def follow(self) -> None:
        """A tensor-parallel rank > 0: run the steps rank 0 sends, its releases first, until it says stop."""
        while (step := self.ranks.receive()).input_ids is not None:
            for event in step.events:
                self._apply(event)
            self.forward(*self.tensors(step))
            self.backend.drain_stats()  # the telemetry rank 0 reports is its own heads'

    def release(self, seq_id: int) -> None:
        """A sequence left the batch: its attention state ends."""
        self._apply(("release", seq_id))

    def rollback(self, seq_id: int, rejected: int, last_slot: int) -> None:
        """A verify step kept all but its last `rejected` rows: the backend takes them back, and the key
        summary holding the last kept position (slot `last_slot`) is recomputed without them."""
        self._apply(("rollback", seq_id, rejected, last_slot))

    def _apply(self, event: tuple) -> None:
        """One change of attention state between steps; rank 0 of a tensor-parallel engine also queues it
        for the other ranks, which apply the same events in the same order before the next step."""
        kind, seq_id, *rest = event
        if kind == "release":
            self.backend.release(seq_id)
        else:
            rejected, last_slot = rest
            self.backend.rollback(seq_id, rejected)
            if rejected:
                pool = self.backend.pool
                slot = torch.tensor([last_slot], device=pool.device)
                for layer in range(pool.spec.num_layers):
                    update_summaries(pool, layer, slot)
        if self.ranks is not None and self.ranks.rank == 0:
            self.ranks.events.append(event)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states of one step: a CUDA-graph replay where the backend names one, else eager."""
        self.backend.begin_step(meta)
        hidden = self.graphs.run(input_ids, meta) if self.graphs is not None else None
        return hidden if hidden is not None else self.model(input_ids, self.backend, meta)

    def draft_limit(self, seq: Sequence) -> int | None:
        """The most drafts the sequence may verify next step and still emit what it would without them."""
        mode, budget = self.attention_of(seq)
        return None if mode == "dense" else self.backend.draft_limit(seq.seq_id, budget, len(seq))

    def attention_key(self, seq: Sequence) -> str:
        """What the sequence's KV depends on beyond its tokens: its attention mode (and sparse budget)."""
        return self.backend.kv_key(self._mode(seq), self._budget(seq))

    def attention_of(self, seq: Sequence) -> tuple[str, int]:
        """The sequence's attention mode and sparse token budget."""
        return self._mode(seq), self._budget(seq)

    def _mode(self, seq: Sequence) -> str:
        override = seq.params.attention
        return override.mode if override and override.mode else self.default_mode

    def _budget(self, seq: Sequence) -> int:
        override = seq.params.attention
        return override.token_budget if override and override.token_budget else self.default_budget
