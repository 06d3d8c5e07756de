"""Device selection and the number of CPU threads."""

from __future__ import annotations

import torch

from engine.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; set device: auto or cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)`; None keeps torch's default."""
    if threads is not None:
        torch.set_num_threads(threads)
