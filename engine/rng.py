"""Seeding and capture/restore of every random number generator a run uses, for exact resumes."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def numpy_state() -> dict[str, Any]:
    """NumPy's global generator state as a tensor and numbers (a checkpoint loads it with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["cached_gaussian"]))


def rng_state() -> dict[str, Any]:
    """The state of every generator, for a checkpoint: tensors, numbers and tuples only."""
    state = {"python": random.getstate(), "numpy": numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by `rng_state`."""
    random.setstate(state["python"])
    set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(seed: int, step: int, stream: int = 0, rank: int = 0, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """A generator determined by (seed, step, stream, rank): batches and augmentations replay exactly on resume,
    and each process of a torchrun world draws its own (rank 0's stream is a single process's)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 31 + stream + (rank << 48))
    return g


class OwnRandomState:
    """A random state of one's own (captured by `capture`, restored by `restore`), swapped in by `active()` around
    what draws from it, so that nothing else in the run draws from it and it draws from nothing else."""

    def __init__(self, capture: Callable[[], Any], restore: Callable[[Any], None], state: Any) -> None:
        self.capture, self.restore, self.state = capture, restore, state

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = self.capture()
        self.restore(self.state)
        try:
            yield
        finally:
            self.state = self.capture()
            self.restore(outer)
