"""From a config file (or a run folder) to a finished run: validate, join torchrun's process group (when
started by torchrun), set the CPU threads, create the folder (rank 0), dispatch to the run's family (the
caller, train.py, says which families there are)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import apply_override, build_config, load_yaml, to_dict
from engine.device import resolve_device, set_threads
from engine.distributed import barrier, broadcast_object, device_for, join, leave, world
from engine.errors import ConfigError, UserError
from engine.hparams import WORLD_SIZE, HParamsSpec, log_run_start
from engine.interrupt import RunInterrupted, StopRequest
from engine.run_dir import default_run_name, discard_unstarted, existing_run_dir, new_run_dir
from engine.run_lock import RunLock
from engine.run_loop import Stop


@dataclass(frozen=True)
class Family:
    """One kind of experiment: its methods, its config schema (a RunConfig), the function that trains a run,
    `train(config, run=, data_root=, resume=, stop=) -> results`, and what it records for TensorBoard's HParams."""

    methods: tuple[str, ...]
    schema: type
    train: Callable[..., dict[str, Any]]
    hparams: HParamsSpec


def resolve_config(data: dict[str, Any], families: Sequence[Family]) -> tuple[Any, Family]:
    """Pick the family from `method`, validate `data` against its schema; (config, the family)."""
    method = data.get("method")
    for family in families:
        if method in family.methods:
            return build_config(family.schema, data), family
    valid = [m for family in families for m in family.methods]
    near = difflib.get_close_matches(str(method), valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"method = {method!r} is not valid{hint}; choose one of: {', '.join(valid)}")


def resume_command(run_path: Path, processes: int) -> str:
    """The command that continues the run in `run_path`, with as many processes as it ran with."""
    launch = f"torchrun --nproc_per_node {processes} train.py" if processes > 1 else "python train.py"
    return f"{launch} --resume {run_path}"


def resolve_data_root(flag: str | None, configured: str | None) -> Path:
    """--data-root, then the config's data.root, then $META_DATA_ROOT, then ./data."""
    for candidate in (flag, configured, os.environ.get("META_DATA_ROOT")):
        if candidate:
            return Path(candidate).expanduser()
    return Path("data")


def run_experiment(
    families: Sequence[Family],
    config_path: Path | None,
    resume: Path | None,
    overrides: list[str],
    data_root: str | None,
    runs_root: Path,
    take_over: bool = False,
    stop: Stop | None = None,
) -> dict[str, Any]:
    """Run (or continue) one experiment; returns its results. It stops at a step boundary when `stop` asks (by
    default, at the first Ctrl-C or SIGTERM). The run folder is locked while the run runs (a stale lock of a killed
    run is removed by `take_over`); a new run that fails with a UserError before writing anything but its config
    leaves no run folder."""
    if resume is not None:
        if overrides:
            raise UserError("--set cannot change a run that is being resumed; start a new run instead")
        run = existing_run_dir(resume)
        data = load_yaml(run.config)
        started_with = data.pop("world_size", 1)
        config, family = resolve_config(data, families)
    else:
        if take_over:
            raise UserError("--take-over takes over a killed run's folder to resume it; use it with --resume")
        data = load_yaml(config_path)
        for assignment in overrides:
            apply_override(data, assignment)
        config, family = resolve_config(data, families)
    lock = None
    try:
        size = join(config.device).size
        if config.processes is not None and config.processes != size:
            raise UserError(f"the config asks for processes = {config.processes} and this run has {size}; start it "
                            f"with torchrun --standalone --nproc_per_node {config.processes} train.py ..., or set "
                            "processes=null to run it with as many as it is started with")
        if resume is not None and started_with != size:
            raise UserError(f"{run.path} was run by {started_with} process(es) and this is {size}; resume it with "
                            f"the same number: {resume_command(run.path, started_with)}")
        if resume is None:
            name = broadcast_object(config.name or default_run_name(config_path))
            lock = RunLock(runs_root / name) if world().is_main else None
            run = new_run_dir(runs_root, name, {**to_dict(config), "world_size": size}, lock)
            barrier()
        elif world().is_main:
            lock = RunLock(run.path)
            lock.acquire(take_over)
        root = resolve_data_root(data_root, config.data.root)
        set_threads(config.threads)
        if world().is_main:
            threads = f"{torch.get_num_threads()}{'' if config.threads else ' (torch default)'}"
            print(f"run folder: {run.path} ({'resumed' if resume is not None else 'new'}; data from {root}; device "
                  f"{resolve_device(device_for(config.device))}, {size} process(es), CPU threads: {threads})",
                  flush=True)
            log_run_start(run.events, [f.hparams for f in families], [m for f in families for m in f.methods],
                          {**family.hparams.values(config), WORLD_SIZE: size})
        try:
            if stop is not None:
                results = _train(config, family.train, run, root, resume is not None, lock, stop)
            else:
                with StopRequest() as signals:
                    results = _train(config, family.train, run, root, resume is not None, lock, signals)
        except KeyboardInterrupt:
            raise RunInterrupted(resume_command(run.path, size)) from None
        if world().is_main:
            print(f"run folder: {run.path} (finished; TensorBoard: tensorboard --logdir {run.path.parent})",
                  flush=True)
        return results
    finally:
        if lock is not None:
            lock.release()
        leave()


def _train(config: Any, train: Callable[..., dict[str, Any]], run: Any, root: Path, resume: bool,
           lock: RunLock | None, stop: Stop) -> dict[str, Any]:
    try:
        return train(config, run=run, data_root=root, resume=resume, stop=stop)
    except UserError:
        if not resume and lock is not None:
            lock.release()
            discard_unstarted(run)
        raise
