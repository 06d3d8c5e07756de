"""From a config file (or a run folder) to a finished run: validate, join torchrun's process group (when
started by torchrun), set the CPU threads, create the folder (rank 0), dispatch."""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import apply_override, build_config, load_yaml, to_dict
from engine.device import set_threads
from engine.distributed import barrier, broadcast_object, join, leave, world
from engine.errors import ConfigError, UserError
from engine.run_dir import default_run_name, discard_unstarted, existing_run_dir, new_run_dir
from engine.run_lock import RunLock


def trainer_families() -> list[tuple[tuple[str, ...], type, str]]:
    """(methods, config dataclass, module whose `train` runs them) for each kind of experiment."""
    from adalfl.config import METHODS as SINGLE_TASK_METHODS
    from adalfl.config import SingleTaskConfig
    from npbml.config import METHODS as EPISODIC_METHODS
    from npbml.config import EpisodicConfig

    return [
        (SINGLE_TASK_METHODS, SingleTaskConfig, "adalfl.trainer"),
        (EPISODIC_METHODS, EpisodicConfig, "npbml.meta_trainer"),
    ]


def resolve_config(data: dict[str, Any]) -> tuple[Any, Callable[..., dict[str, Any]]]:
    """Pick the config schema from `method`, validate `data` against it, and find its trainer."""
    families = trainer_families()
    method = data.get("method")
    for methods, schema, module in families:
        if method in methods:
            return build_config(schema, data), importlib.import_module(module).train
    valid = [m for methods, _, _ in families for m in methods]
    near = difflib.get_close_matches(str(method), valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"method = {method!r} is not valid{hint}; choose one of: {', '.join(valid)}")


def resolve_data_root(flag: str | None, configured: str | None) -> Path:
    """--data-root, then the config's data.root, then $META_DATA_ROOT, then ./data."""
    for candidate in (flag, configured, os.environ.get("META_DATA_ROOT")):
        if candidate:
            return Path(candidate).expanduser()
    return Path("data")


def run_experiment(
    config_path: Path | None,
    resume: Path | None,
    overrides: list[str],
    data_root: str | None,
    runs_root: Path,
    take_over: bool = False,
) -> dict[str, Any]:
    """Run (or continue) one experiment; returns its results. The run folder is locked while the run runs (a
    stale lock of a killed run is removed by `take_over`); a new run that fails with a UserError before writing
    anything but its config leaves no run folder."""
    if resume is not None:
        if overrides:
            raise UserError("--set cannot change a run that is being resumed; start a new run instead")
        run = existing_run_dir(resume)
        data = load_yaml(run.config)
        started_with = data.pop("world_size", 1)
        config, train = resolve_config(data)
    else:
        if take_over:
            raise UserError("--take-over takes over a killed run's folder to resume it; use it with --resume")
        data = load_yaml(config_path)
        for assignment in overrides:
            apply_override(data, assignment)
        config, train = resolve_config(data)
    lock = None
    try:
        size = join(config.device).size
        if resume is not None and started_with != size:
            launch = f"torchrun --nproc_per_node {started_with} train.py" if started_with > 1 else "python train.py"
            raise UserError(f"{run.path} was run by {started_with} process(es) and this is {size}; resume it with "
                            f"the same number: {launch} --resume {run.path}")
        if resume is None:
            name = broadcast_object(config.name or default_run_name(config_path))
            lock = RunLock(runs_root / name) if world().is_main else None
            run = new_run_dir(runs_root, name, {**to_dict(config), "world_size": size}, lock)
            barrier()
        elif world().is_main:
            lock = RunLock(run.path)
            lock.acquire(take_over)
        return _train(config, train, run, resolve_data_root(data_root, config.data.root), resume is not None, lock)
    finally:
        if lock is not None:
            lock.release()
        leave()


def _train(config: Any, train: Callable[..., dict[str, Any]], run: Any, root: Path, resume: bool,
           lock: RunLock | None) -> dict[str, Any]:
    try:
        set_threads(config.threads)
        return train(config, run=run, data_root=root, resume=resume)
    except UserError:
        if not resume and lock is not None:
            lock.release()
            discard_unstarted(run)
        raise
