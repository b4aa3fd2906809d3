"""The units each decoding sequence's retrieval heads keep reading between reselections.

One preallocated tensor per layer, a row per sequence (its slot, held from its first sparse decode step
until it leaves the batch), so the torch path and the Triton path inside CUDA graphs read and write the
same state: a sequence keeps its selection, and its reselection schedule, whichever path runs its step.
The last row is scratch: padded rows of a CUDA-graph batch point there.
With drift reselection on, each selection also keeps its anchor: the query it was made with.
"""

from __future__ import annotations

import torch


class SelectionTable:
    def __init__(self, num_layers: int, heads: int, device: torch.device):
        self.num_layers, self.heads, self.device = num_layers, heads, device
        self.slots: dict[int, int] = {}  # seq_id -> row
        self.free: list[int] = []
        self.units: list[torch.Tensor] = []  # per layer [rows + 1, heads, width] int32, -1 = none
        self.anchors: list[torch.Tensor] = []  # per layer [rows + 1, heads, anchor_dim] float32 (drift)
        self.anchor_dim = 0
        self.rows = self.width = 0
        self.version = 0  # bumped whenever the tensors are reallocated (captured graphs read them)

    @property
    def scratch(self) -> int:
        return self.rows

    def reserve(self, rows: int, width: int) -> None:
        """Room for `rows` sequences of `width` units, keeping what is stored."""
        if rows <= self.rows and width <= self.width:
            return
        old, old_rows = self.units, self.rows
        self.free += list(range(self.rows, max(rows, self.rows)))
        self.rows, self.width = max(rows, self.rows), max(width, self.width)
        self.units = [torch.full((self.rows + 1, self.heads, self.width), -1, dtype=torch.int32,
                                 device=self.device) for _ in range(self.num_layers)]
        for new, kept in zip(self.units, old, strict=False):
            new[:old_rows, :, :kept.shape[2]] = kept[:old_rows]
        self._resize_anchors(old_rows)
        self.version += 1

    def keep_anchors(self, dim: int) -> None:
        """Keep a query of `dim` floats per selection (0: none), for drift reselection."""
        if dim != self.anchor_dim:
            self.anchor_dim, self.anchors = dim, []
            self._resize_anchors(0)

    def _resize_anchors(self, kept_rows: int) -> None:
        if not self.anchor_dim:
            return
        old = self.anchors
        self.anchors = [torch.zeros(self.rows + 1, self.heads, self.anchor_dim, device=self.device)
                        for _ in range(self.num_layers)]
        for new, kept in zip(self.anchors, old, strict=False):
            new[:kept_rows] = kept[:kept_rows]

    def slot(self, seq_id: int) -> int:
        """The sequence's row, handed out on first use (the table doubles when full)."""
        row = self.slots.get(seq_id)
        if row is None:
            if not self.free:
                self.reserve(max(8, 2 * self.rows), self.width)
            row = self.slots[seq_id] = self.free.pop()
            for units in self.units:  # nothing of the row's previous holder may be read as chosen
                units[row].fill_(-1)
        return row

    def release(self, seq_id: int) -> None:
        row = self.slots.pop(seq_id, None)
        if row is not None:
            self.free.append(row)

    def clear(self) -> None:
        for seq_id in list(self.slots):
            self.release(seq_id)
