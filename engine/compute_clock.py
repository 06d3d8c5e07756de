"""A run's training compute: wall and CPU seconds of its training steps, evaluations and logging excluded.

On a CPU the compute of a step is its process CPU time, which other processes on the machine (a grid's other
cells, a test suite) do not inflate; on a GPU it is the wall time (the device is the run's own, and its work is
asynchronous to the process). `seconds` gives the one that fits the device; equal-compute budgets use it.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class ComputeClock:
    """Accumulates the time between `start` and `stop` calls, on the wall clock and the process CPU clock."""

    def __init__(self) -> None:
        self.wall, self.cpu = 0.0, 0.0
        self._started: tuple[float, float] | None = None

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        wall, cpu = self._started
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    def seconds(self, device: torch.device) -> float:
        """The training compute: CPU seconds on a CPU, wall seconds on an accelerator."""
        return self.cpu if device.type == "cpu" else self.wall

    def state_dict(self) -> dict[str, Any]:
        return {"wall": self.wall, "cpu": self.cpu}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wall, self.cpu = state["wall"], state["cpu"]
