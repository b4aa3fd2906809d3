"""SmartSpec's goodput controller: each step, the draft length k in 0..K that maximises expected
generated tokens per second of predicted step time.

    goodput(k) = sum over decoding sequences of (1 - a_i^(k+1)) / (1 - a_i)  /  T(k)

a_i is the sequence's acceptance (an EMA of kept / proposed drafts, started from its drafter's EMA).
T(k) is a linear model of the step time the engine fits online over the last `window` measured steps
on the step's features: 1, sequences, batched tokens, KV tokens read, KV tokens x query rows, draft
tokens proposed, draft rounds. The fit is non-negative least squares on relative error: every feature
can only add time (the features move together, and an unconstrained fit gave drafts a negative cost,
so at batch 32 it chose k = 4 where k = 0 was 1.3x faster), and a step is weighted by 1 / its time, so
slow prefill steps or a first step that compiles do not drown the decode steps the choice is about.
Until `warmup` steps are measured it cycles through k = 0..K to see each; afterwards one step in
`explore_every` tries a neighbour of the current k so the fit keeps seeing more than one shape.
k = 0 gets a 10% bonus (it must win by 10% to be dropped), and a new k is taken only when it beats
the current one by `hysteresis`.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

log = logging.getLogger("needle.spec_decode")

NUM_FEATURES = 7


@dataclass
class StepShape:
    """What one step costs, as the step-time model sees it."""

    num_seqs: int
    num_tokens: int  # batched tokens (prefill + decode rows + drafts)
    kv_tokens: int  # context tokens of the scheduled sequences
    kv_rows: int  # sum of context x query rows (the attention work of multi-row steps)
    draft_tokens: int  # drafts proposed (each costs the drafter something)
    draft_rounds: int  # sequential drafter passes (self_sparse / draft_model: max k)

    def features(self) -> list[float]:
        return [1.0, self.num_seqs, self.num_tokens, self.kv_tokens, self.kv_rows, self.draft_tokens,
                self.draft_rounds]


def nonnegative_solve(a: torch.Tensor, b: torch.Tensor, start: list[float] | None = None,
                      sweeps: int = 100) -> list[float]:
    """argmin over c >= 0 of c'ac/2 - b'c (a positive definite), by projected coordinate descent on
    plain floats (a 7 x 7 system: tensor ops would cost more than the arithmetic), warm-started."""
    rows, rhs = a.tolist(), b.tolist()
    c = list(start) if start is not None else [0.0] * len(rhs)
    for _ in range(sweeps):
        moved = 0.0
        for j, row in enumerate(rows):
            new = max(0.0, c[j] - (sum(r * v for r, v in zip(row, c, strict=True)) - rhs[j]) / row[j])
            moved = max(moved, abs(new - c[j]))
            c[j] = new
        if moved < 1e-12:
            break
    return c


def expected_tokens(a: float, k: int) -> float:
    """Tokens a sequence emits with k drafts at per-draft acceptance a (the bonus included)."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class GoodputController:
    def __init__(self, max_k: int, dynamic: bool = True, zero_bonus: float = 1.1, hysteresis: float = 0.05,
                 window: int = 256, warmup: int = 16, explore_every: int = 16, ridge: float = 1e-6,
                 model_drafts: bool = True):
        self.max_k, self.dynamic = max_k, dynamic
        self.zero_bonus, self.hysteresis = zero_bonus, hysteresis
        self.warmup, self.explore_every, self.ridge = warmup, explore_every, ridge
        self.model_drafts = model_drafts  # the drafter runs the model once per round
        self.samples: deque[tuple[list[float], float]] = deque(maxlen=window)
        self.coef: torch.Tensor | None = None
        self._scaled: list[float] | None = None  # the fit in scaled columns, the next fit's start
        self.k = max_k if not dynamic else 0
        self.steps = 0
        self.fit_error = float("nan")  # mean relative error of the model on the window

    # ---- the step-time model ---------------------------------------------------------------------

    def observe(self, shape: StepShape, seconds: float) -> float | None:
        """Record one measured step; -> what the model predicted for it (None before the first fit)."""
        predicted = self.predict(shape) if self.coef is not None else None
        self.samples.append((shape.features(), seconds))
        self.steps += 1
        if self.steps >= min(self.warmup, 8) and self.steps % 8 == 0:
            self.fit()
        return predicted

    def fit(self) -> None:
        """Non-negative least squares of relative error over the window (every 8th step)."""
        x = torch.tensor([f for f, _ in self.samples], dtype=torch.float64)
        y = torch.tensor([t for _, t in self.samples], dtype=torch.float64)
        w = 1.0 / y.clamp(min=1e-9)
        scale = x.abs().amax(0).clamp(min=1.0)  # columns on one scale, so the ridge treats them alike
        xs = x / scale * w[:, None]
        a = xs.T @ xs + self.ridge * len(y) * torch.eye(NUM_FEATURES, dtype=torch.float64)
        self._scaled = nonnegative_solve(a, xs.T @ (y * w), self._scaled)
        self.coef = torch.tensor(self._scaled, dtype=torch.float64) / scale
        pred = x @ self.coef
        self.fit_error = float(((pred - y).abs() / y.clamp(min=1e-9)).mean())
        if self.steps % 256 == 0:
            log.info("step-time model over %d steps: mean relative error %.1f%%", len(y),
                     100 * self.fit_error)

    def predict(self, shape: StepShape) -> float:
        assert self.coef is not None
        return max(float(torch.tensor(shape.features(), dtype=torch.float64) @ self.coef), 1e-9)

    # ---- choosing k ------------------------------------------------------------------------------

    def shape_for(self, k: int, contexts: list[int], drafting: int) -> StepShape:
        """The decode part of a step where `drafting` of the sequences (contexts) speculate k tokens."""
        b = len(contexts)
        rows = [k + 1] * drafting + [1] * (b - drafting)
        return StepShape(b, sum(rows), sum(contexts),
                         sum(c * r for c, r in zip(contexts, rows, strict=True)), k * drafting,
                         k if (self.model_drafts and drafting) else 0)

    def goodput(self, k: int, contexts: list[int], acceptance: list[float]) -> float:
        tokens = sum(expected_tokens(a, k) for a in acceptance) + (len(contexts) - len(acceptance))
        return tokens / self.predict(self.shape_for(k, contexts, len(acceptance)))

    def choose(self, contexts: list[int], acceptance: list[float]) -> int:
        """k for this step: contexts of every decoding sequence, acceptance of those that may speculate."""
        if not self.dynamic:
            return self.max_k
        if not acceptance:
            return 0
        if self.coef is None or self.steps < self.warmup:
            return self.steps % (self.max_k + 1)  # warm-up: see every k
        scores = [self.goodput(k, contexts, acceptance) for k in range(self.max_k + 1)]
        scores[0] *= self.zero_bonus
        best = max(range(self.max_k + 1), key=scores.__getitem__)
        if scores[best] > scores[self.k] * (1 + self.hysteresis):
            self.k = best
        if self.steps % self.explore_every == self.explore_every - 1:  # keep the fit honest
            return max(0, self.k - 1) if self.k == self.max_k or self.steps % 2 else self.k + 1
        return self.k
