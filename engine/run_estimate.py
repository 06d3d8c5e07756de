"""The projected wall time of a run, measured on its first steps and printed once per phase, so that a user on
a CPU learns at the start that a GPU-sized config would take days, and which config fits instead; and the whole
run's remaining time, kept up to date in the progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def evaluations_left(total: int, every: int, done: int) -> int:
    """Evaluations still to come after step `done` of `total`, with one every `every` steps and one at the end."""
    return total // every - done // every + (1 if total % every else 0)


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


# A progress bar without tqdm's own rate and remaining time (its smoothed rate counts evaluation pauses as slow
# steps); the run's `RunEta` goes into the postfix instead.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class RunEta:
    """The remaining wall time of a whole run: the mean wall time of its steps since `restart` (evaluation pauses,
    timed by `evaluation`, left out, so that they do not throw it around) times the steps left, plus the
    evaluations left at their measured mean cost (before the first, at `expect_evaluation`'s estimate). It adds no
    device sync: a step's wall time is read off the host clock, which the logging intervals' reads keep in step
    with the device."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._paused, self._steps = 0.0, 0
        self._evaluations: list[float] = []
        self._expected_evaluation = 0.0

    def restart(self) -> None:
        """Measure the step time afresh from here (a new phase, whose steps cost otherwise)."""
        self._started, self._paused, self._steps = time.perf_counter(), 0.0, 0

    def step_done(self) -> None:
        if self._started is None:
            self.restart()
        self._steps += 1

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Time an evaluation (a pause of the steps)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._evaluations.append(time.perf_counter() - started)
            self._paused += self._evaluations[-1]

    def expect_evaluation(self, seconds: float) -> None:
        """An evaluation's cost until one has been timed."""
        self._expected_evaluation = seconds

    def remaining(self, steps_left: int, evaluations_left: float) -> float | None:
        """Seconds left (None before the first step)."""
        if self._started is None or self._steps == 0:
            return None
        per_step = (time.perf_counter() - self._started - self._paused) / self._steps
        evaluation = (sum(self._evaluations) / len(self._evaluations) if self._evaluations
                      else self._expected_evaluation)
        return per_step * steps_left + evaluation * evaluations_left

    def text(self, steps_left: int, evaluations_left: float) -> str:
        """The remaining time for the progress bar: "12 min", or "?" before the first step."""
        seconds = self.remaining(steps_left, evaluations_left)
        return "?" if seconds is None else format_duration(seconds)
