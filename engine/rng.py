"""Seeding and capture/restore of every random number generator a run uses, for exact resumes."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every generator, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
