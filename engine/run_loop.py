"""What every training loop of the project shares, whatever it trains: restoring its state from a checkpoint,
and the end of a step, the one place a run checkpoints or stops (a stop request is honoured there, after a
checkpoint, never mid-update). The single-task trainer, the episodic trainer and backbone pre-training all use it;
the stop request is an object the caller hands in (train.py's Ctrl-C / SIGTERM handler, or a test's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from engine.checkpoint import load_checkpoint, restoring
from engine.distributed import any_rank


class Stop(Protocol):
    """A stop request: `requested` turns true when the run should stop at its next step boundary."""

    requested: bool


def restore(path: Path, load: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the weights-only checkpoint at `path` and hand it to `load`; a checkpoint that does not fit the run's
    objects is one clear error. Returns the checkpoint."""
    state = load_checkpoint(path)
    with restoring(path):
        load(state)
    return state


class StepBoundary:
    """Called at the end of every step: saves when `every` steps have passed, at the last step, or when a stop was
    requested on any rank; then, for a stop, raises KeyboardInterrupt (the run's last checkpoint is kept)."""

    def __init__(self, stop: Stop, save: Callable[[], None], every: int, total: int) -> None:
        self.stop, self.save, self.every, self.total = stop, save, every, total

    def __call__(self, step: int) -> None:
        stopping = any_rank(self.stop.requested)
        if stopping or step % self.every == 0 or step == self.total:
            self.save()
        if stopping:
            raise KeyboardInterrupt
