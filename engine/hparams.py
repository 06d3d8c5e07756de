"""A run's hyper-parameters and final metrics for TensorBoard's HParams dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def hparam_value(value: Any) -> int | float | str:
    """Numbers and strings as they are; anything else (None, a list, a bool, which torch would record as 1/0)
    as its string form."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return str(value)


def log_hparams(log_dir: Path, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """Record `hparams` and `metrics` in the event files of `log_dir` itself (not a timestamped subfolder).

    The metric names must not be tags the run already logs with `add_scalar` (e.g. use `hparams/...`):
    add_hparams writes each metric as a scalar of that name.
    """
    with SummaryWriter(log_dir) as writer:
        writer.add_hparams({k: hparam_value(v) for k, v in hparams.items()},
                           {k: float(v) for k, v in metrics.items()}, run_name=".")
