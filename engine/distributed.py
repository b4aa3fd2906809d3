"""Tensor parallelism's processes: rank 0 (the engine the server or LLM drives) starts ranks 1..N-1 itself,
sends them each step once, and every rank joins the all-reduces after its row-parallel layers.

Rank 0 alone schedules and samples, so the other ranks need per step only what the model and the
attention backend read: the token ids, the attention metadata's per-sequence lists (page tables are
rank 0's, identical on every rank: each rank's pool holds the same pages for its own KV heads; only
their changes travel, `PageTables`), and the changes of per-sequence attention state since the last
step (releases, speculation rollbacks), which the other ranks apply in rank 0's order. A lost rank is
fatal: `RankLost`, raised by `check_alive` or by any failure of a distributed step (the ranks are then
out of lockstep), stops the engine.

Two process groups: the all-reduces' (NCCL on CUDA, gloo on the CPU; a failure surfaces within
COLLECTIVE_TIMEOUT, at once when a peer's socket closes) and a gloo group for the step messages, whose
timeout is long because the other ranks wait on it while the server idles.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from needle.engine.config import EngineArgs
from needle.engine.models.layers import Attention, GatedMLP

log = logging.getLogger("needle.engine")

COLLECTIVE_TIMEOUT = timedelta(minutes=5)
STEP_TIMEOUT = timedelta(days=3650)  # an idle server sends no steps; the other ranks wait as long


class RankLost(RuntimeError):
    """A tensor-parallel rank died or a distributed step failed: the engine cannot go on."""


@dataclass
class Step:
    """What rank 0 sends the other ranks once per step; `input_ids` None tells them to stop."""

    input_ids: list[int] | None
    metadata: dict = field(default_factory=dict)  # AttentionMetadata.build's per-sequence lists
    # Changes of attention state since the last step, in rank 0's order: ("release", seq_id) and
    # ("rollback", seq_id, rejected rows, slot of the last kept position) (engine/runner.py applies them).
    events: list[tuple] = field(default_factory=list)


@dataclass(frozen=True)
class RankAddress:
    """Where a started rank finds the others."""

    rank: int
    size: int
    port: int


class PageTables:
    """Each sequence's page table as the other ranks last received it, so that a step carries only what
    changed since: usually nothing, or one appended page (a table only grows, shrinks at its end after a
    speculation rollback, or starts over after a release)."""

    def __init__(self):
        self.known: dict[int, list[int]] = {}

    def encode(self, seq_ids: list[int], tables: list[list[int]]) -> list[tuple[int, list[int]]]:
        """Rank 0: per sequence, (how many leading pages the other ranks already have, the pages after)."""
        updates = []
        for seq_id, table in zip(seq_ids, tables, strict=True):
            old = self.known.get(seq_id, [])
            if table[:len(old)] == old:
                keep = len(old)
            elif old[:len(table)] == table:
                keep = len(table)
            else:
                keep = 0
            updates.append((keep, table[keep:]))
            self.known[seq_id] = list(table)
        return updates

    def decode(self, seq_ids: list[int], updates: list[tuple[int, list[int]]]) -> list[list[int]]:
        """The other ranks: the full tables back from rank 0's updates."""
        tables = []
        for seq_id, (keep, tail) in zip(seq_ids, updates, strict=True):
            self.known[seq_id] = self.known.get(seq_id, [])[:keep] + tail
            tables.append(self.known[seq_id])
        return tables

    def forget_released(self, events: list[tuple]) -> None:
        """A released sequence's table is gone (both sides drop it at the same point of the event order)."""
        for kind, seq_id, *_ in events:
            if kind == "release":
                self.known.pop(seq_id, None)


def refusal(args: EngineArgs, device_type: str) -> str | None:
    """Why --tensor-parallel-size cannot run with these settings, or None."""
    size = args.tensor_parallel_size
    if size == 1:
        return None
    if device_type == "cuda" and torch.cuda.device_count() < size:
        return (f"--tensor-parallel-size {size} needs {size} GPUs, {torch.cuda.device_count()} are visible "
                "(CUDA_VISIBLE_DEVICES)")
    if args.cpu_kv_cache_memory is not None:
        return "--cpu-kv-cache-memory (value offload) cannot be combined with --tensor-parallel-size yet"
    # imported here: spec_decode/ imports the runner, which imports this module
    from needle.engine.spec_decode.config import SpeculativeConfig

    spec = SpeculativeConfig.parse(args.speculative_config)
    if spec is not None and spec.method != "ngram":
        return (f"--speculative-config method {spec.method} cannot be combined with --tensor-parallel-size "
                "yet (its drafts run outside the step the other ranks follow); ngram can")
    if args.sparse_min_recall > 0:
        return ("--sparse-min-recall cannot be combined with --tensor-parallel-size: each rank measures "
                "recall over its own heads only, so the ranks would widen budgets differently")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallel:
    """This process's rank, its process groups, and (on rank 0) the processes of the other ranks."""

    def __init__(self, address: RankAddress, device: torch.device,
                 workers: list[subprocess.Popen] | None = None):
        if dist.is_initialized():
            raise RuntimeError("one tensor-parallel engine per process: close() the other one first")
        self.rank, self.size, self.device = address.rank, address.size, device
        self.workers = workers or []
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # what launches on the current device (Triton) runs on this rank's
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{address.port}", rank=self.rank,
                                world_size=self.size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        self.steps = dist.new_group(list(range(self.size)), timeout=STEP_TIMEOUT, backend="gloo")
        self.events: list[tuple] = []  # rank 0: the attention-state changes since the last step sent
        self.page_tables = PageTables()

    @classmethod
    def launch(cls, args: EngineArgs, device: torch.device) -> TensorParallel:
        """Rank 0: start ranks 1..N-1, each a fresh Python process (`python -m needle.engine.rank_worker`,
        so no script needs a __main__ guard) that builds its own shard, and join them."""
        size, port = args.tensor_parallel_size, free_port()
        workers = []
        for r in range(1, size):
            w = subprocess.Popen([sys.executable, "-m", "needle.engine.rank_worker"], stdin=subprocess.PIPE)
            w.stdin.write(pickle.dumps((args, RankAddress(r, size, port))))
            w.stdin.close()
            log.info("tensor parallel: rank %d of %d started (pid %d)", r, size, w.pid)
            workers.append(w)
        ranks = cls(RankAddress(0, size, port), device, workers)
        atexit.register(ranks.close)
        return ranks

    @staticmethod
    def rank_device(device: torch.device, rank: int) -> torch.device:
        """Rank r computes on GPU r (of those visible), or on the CPU."""
        return torch.device("cuda", rank) if device.type == "cuda" else device

    def share_cpu(self) -> None:
        """On the CPU the ranks share the cores: each takes its 1/N of the threads."""
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // self.size))

    def reduce_after_row_parallel_layers(self, model: torch.nn.Module) -> None:
        """Each rank's o_proj and down_proj see only its heads' and MLP slice's inputs: sum their outputs."""
        for m in model.modules():
            if isinstance(m, (Attention, GatedMLP)):
                m.reduce = all_reduce

    def smallest(self, value: int) -> int:
        """The minimum of `value` over the ranks (the KV budget every rank's pool can hold)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # -- the step messages ------------------------------------------------------------------------

    def send(self, step: Step) -> None:
        """Rank 0: the step to every other rank, with the events queued since the last one."""
        step.events, self.events = self.events, []
        self.page_tables.forget_released(step.events)
        if step.input_ids is not None:
            updates = self.page_tables.encode(step.metadata["seq_ids"], step.metadata["page_tables"])
            step = dataclasses.replace(step, metadata={**step.metadata, "page_tables": updates})
        payload = pickle.dumps(step)
        dist.broadcast(torch.tensor([len(payload)], dtype=torch.int64), src=0, group=self.steps)
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.steps)

    def receive(self) -> Step:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.steps)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self.steps)
        step: Step = pickle.loads(payload.numpy().tobytes())
        self.page_tables.forget_released(step.events)
        if step.input_ids is not None:
            meta = step.metadata
            meta["page_tables"] = self.page_tables.decode(meta["seq_ids"], meta["page_tables"])
        return step

    # -- liveness ---------------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Rank 0's watchdog: RankLost when another rank's process has exited."""
        for rank, w in enumerate(self.workers, start=1):
            if w.poll() is not None:
                raise RankLost(f"tensor-parallel rank {rank} (pid {w.pid}) exited with code {w.returncode}")

    def lost(self, err: Exception, wait_s: float = 1.0) -> RankLost:
        """What a failed distributed step means: the rank whose process exited (a peer's socket closes
        as it dies, so give its exit a moment to show), else the failure itself."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                self.check_alive()
            except RankLost as lost:
                return lost
            time.sleep(0.05)
        return RankLost(f"a tensor-parallel step failed: {type(err).__name__}: {err}")

    def close(self) -> None:
        """Rank 0: stop the other ranks, then leave the process groups (another engine may start)."""
        if not self.workers:
            return
        try:
            if all(w.poll() is None for w in self.workers):
                self.send(Step(None))
        except RuntimeError:  # a rank is gone already
            pass
        for w in self.workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        self.workers = []
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of a row-parallel layer's partial outputs (in place)."""
    dist.all_reduce(x)
    return x


def ignore_interrupts() -> None:
    """The other ranks leave Ctrl-C to rank 0, which drains and then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
