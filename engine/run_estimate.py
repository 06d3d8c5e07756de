"""The projected wall time of a run, measured on its first steps and printed once per phase, so that a user on
a CPU learns at the start that a GPU-sized config would take days, and which config fits instead."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

DAY_S = 86_400.0


def format_duration(seconds: float) -> str:
    """A wall time the way a person reads it: 45 s, 12 min, 3.4 h, 9.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5_400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3_600:.1f} h"
    return f"{seconds / DAY_S:.1f} days"


def estimate_message(device: torch.device, parts: list[tuple[str, float]], advice: str) -> str:
    """The projected wall time of the rest of a run, part by part (name, seconds); on a CPU where it exceeds a
    day, with `advice` (what fits a CPU)."""
    total = sum(seconds for _, seconds in parts)
    message = (f"estimate on {device}: " + " + ".join(f"{name} ~{format_duration(seconds)}" for name, seconds in parts)
               + f" = ~{format_duration(total)} for the rest of the run")
    if device.type == "cpu" and total > DAY_S:
        message += f". That is more than a day on the CPU: {advice}; this run continues"
    return message


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds `work()` takes, the device synchronised before and after."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times steps WARMUP + 1 .. WARMUP + MEASURED of a phase (two device syncs in all, none per step) and then,
    once, calls `report(seconds_per_step)`."""

    WARMUP, MEASURED = 2, 10

    def __init__(self, device: torch.device, report: Callable[[float], None]) -> None:
        self.device, self.report = device, report
        self.steps, self._started = 0, 0.0

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == self.WARMUP:
            synchronize(self.device)
            self._started = time.perf_counter()
        elif self.steps == self.WARMUP + self.MEASURED:
            synchronize(self.device)
            self.report((time.perf_counter() - self._started) / self.MEASURED)
