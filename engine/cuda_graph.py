"""CUDA graphs for decode and verify steps: one graph per (batch bucket, query length, backend graph
key), replayed with the step's inputs copied into static buffers, so a small-batch decode step is one
launch instead of ~20 per layer.

A step runs through a graph when the backend names one (`backend.graph_key(meta)`, None = run eagerly),
the batch fits the largest bucket, which is --max-num-seqs, and every sequence brings the same number of
queries n: 1 for decode, 1 + k for a speculative verify of k drafts (SGLang likewise keeps a graph set
per draft length). Batches are padded up to their bucket: padded sequences write no KV (slot -1) and
attend to nothing (context length 0). Page tables are padded to the next power of two of their width,
and graphs are kept per width, so short contexts keep their short graphs after a long one was served
(the kernels' work grows with the table's width); a width beyond the static buffer reallocates it and
drops every graph.
"""

from __future__ import annotations

import torch

from needle.attention.base import AttentionBackend, AttentionMetadata

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class CudaGraphRunner:
    def __init__(self, model, backend: AttentionBackend, device: torch.device, max_batch: int = 64,
                 max_query_len: int = 1):
        self.model, self.backend, self.device = model, backend, device
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_query_len = max_query_len
        self.width = 0
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None  # the first capture's private pool, shared by the later ones
        n, tokens = self.buckets[-1], self.buckets[-1] * max_query_len
        self.ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slots = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.ctx = torch.zeros(n, dtype=torch.int32, device=device)
        # query_start_loc per query length: sequence i's queries are rows i*q .. i*q + q - 1
        self.starts = {q: torch.arange(0, (n + 1) * q, q, dtype=torch.int64, device=device)
                       for q in range(1, max_query_len + 1)}
        self.tables = torch.zeros(n, 0, dtype=torch.int32, device=device)
        backend.reserve(n)  # buffers the graphs read must never move

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states [T, hidden] from a graph replay, or None when this step must run eagerly."""
        key = self.backend.graph_key(meta)
        b, q = meta.num_seqs, meta.uniform_query_len
        if key is None or q is None or q > self.max_query_len or b > self.buckets[-1]:
            return None
        width = meta.page_tables.shape[1]
        padded = max(256, 1 << (width - 1).bit_length())
        if padded > self.width:
            self._grow(padded)
        bucket = next(x for x in self.buckets if x >= b)
        t = b * q
        self.ids[:t].copy_(input_ids)
        self.positions[:t].copy_(meta.positions)
        self.slots[:t].copy_(meta.slot_mapping)
        self.slots[t:bucket * q].fill_(-1)
        self.ctx[:b].copy_(meta.context_lens_t)
        self.ctx[b:bucket].fill_(0)
        self.tables[:b, :width].copy_(meta.page_tables)
        entry = self.graphs.get((bucket, q, padded, key))
        if entry is None:
            entry = self.graphs[(bucket, q, padded, key)] = self._capture(bucket, q, padded, meta)
        graph, out = entry
        graph.replay()
        return out[:t]

    def _grow(self, width: int) -> None:
        self.width = width
        self.tables = torch.zeros(self.buckets[-1], self.width, dtype=torch.int32, device=self.device)
        self.graphs.clear()
        self.mempool = None  # the old pool dies with its graphs; reusing its id trips the allocator

    def _static_meta(self, bucket: int, q: int, width: int, meta: AttentionMetadata) -> AttentionMetadata:
        t = bucket * q
        return meta.padded(bucket, query_start_loc=self.starts[q][:bucket + 1],
                           context_lens_t=self.ctx[:bucket], page_tables=self.tables[:bucket, :width],
                           slot_mapping=self.slots[:t], positions=self.positions[:t])

    def _capture(self, bucket: int, q: int, width: int, meta: AttentionMetadata):
        static = self._static_meta(bucket, q, width, meta)
        ids = self.ids[:bucket * q]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles allocations (writes idempotent)
            self.model(ids, self.backend, static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.model(ids, self.backend, static)
        if self.mempool is None:
            self.mempool = graph.pool()
        return graph, out
