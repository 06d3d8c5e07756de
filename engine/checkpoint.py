"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over the old one."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError


def atomic_write_bytes(path: Path, writer) -> None:
    """Call `writer(file)` on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` with torch.save, atomically."""
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with torch's weights-only unpickler (tensors, numbers, strings and containers:
    loading runs no code); a missing, corrupt or foreign file is a UserError."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; the run has not saved one yet, start it without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(
            f"checkpoint {path} holds Python objects beyond tensors and plain data ({refused.strip()}); this "
            "project's checkpoints never do, so it was written by something else (or an older version), and "
            "loading it could run code: it is refused. Start the run again in a new folder."
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); it may be truncated. "
            "Delete the run folder and start again."
        ) from None


@contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Around loading a checkpoint's state into the run's objects: a checkpoint that does not fit them
    (written by another version of the code, or for another model) is a UserError, not a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, RuntimeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint {path} does not fit this run's model ({type(exc).__name__}: {detail}); it was written "
            "by another version of the code or for other model settings. Start the run again (without --resume, "
            "or in a new folder)."
        ) from exc
