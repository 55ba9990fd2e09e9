"""Learning-rate schedules for short, CPU-time-budgeted runs.

``progress`` is the fraction of the run's budget spent (CPU time or steps), so a schedule behaves
the same whether the run is stopped by time or by step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """``kind``: constant (peak after warm-up), cosine (decay to ``final_lr``) or step (×0.1 at 80 %,
    ×0.01 at 95 % of the run). ``warmup_steps`` ramps linearly from 0 to ``peak_lr``."""

    kind: str = "cosine"
    peak_lr: float = 1e-3
    final_lr: float = 1e-5
    warmup_steps: int = 300

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {KINDS}")

    def lr(self, step: int, progress: float) -> float:
        """Learning rate at optimiser step ``step`` with ``progress`` ∈ [0, 1] of the budget spent."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        p = min(max(progress, 0.0), 1.0)
        if self.kind == "constant":
            base = self.peak_lr
        elif self.kind == "cosine":
            base = self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1 + math.cos(math.pi * p))
        else:
            base = self.peak_lr * (0.01 if p >= 0.95 else 0.1 if p >= 0.8 else 1.0)
        return warm * base
