"""A device-side record of the first step whose loss or meta-gradient was not finite, read only when the
trainer checks it (at logging intervals and before checkpoints), so the step itself never waits on the device."""

from __future__ import annotations

import torch

from engine.distributed import first_over_ranks
from engine.errors import NonFiniteError


class NonFiniteGuard:
    """`record(finite, step)` after every step; `check(advice)` raises NonFiniteError naming the first bad step."""

    def __init__(self, unit: str = "step") -> None:
        self.unit = unit  # what a step is called in the message (e.g. "meta-iteration")
        self.first_bad: torch.Tensor | None = None

    def record(self, finite: torch.Tensor, step: int) -> None:
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)

    def check(self, what: str, advice: str) -> None:
        """Under torchrun every rank checks at the same step and raises together (the first bad step of any)."""
        step = first_over_ranks(int(self.first_bad) if self.first_bad is not None else -1)
        if step >= 0:
            raise NonFiniteError(f"{what} became non-finite at {self.unit} {step}; {advice}")
