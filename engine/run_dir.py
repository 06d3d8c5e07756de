"""The run folder: resolved config, TensorBoard events, checkpoint and results.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.checkpoint import atomic_write_bytes
from engine.errors import UserError
from engine.hparams import RUN_START_SUFFIX
from engine.run_lock import RunLock


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run's folder."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.path / "best.pt"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def events(self) -> Path:
        """Where the run's TensorBoard events go: the run folder itself, so that TensorBoard names the run after
        it (phase 1, a loss search and pre-training write to sub-folders of their own). A run folder made before
        this layout keeps its `tensorboard/` folder."""
        legacy = self.path / "tensorboard"
        return legacy if legacy.is_dir() else self.path


EVENT_FILES = "events.out.tfevents.*"


def clear_events(folder: Path) -> None:
    """Remove the TensorBoard event files under `folder` (a failed start's), and folders they leave empty."""
    for events in folder.rglob(EVENT_FILES):
        events.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


def _refuse_if_holds_a_run(run: RunDir) -> None:
    if run.checkpoint.exists() or run.results.exists():
        raise UserError(
            f"run folder {run.path} already holds a run; continue it with --resume {run.path} "
            "or choose another name with --set name=..."
        )


def new_run_dir(runs_root: Path, name: str, config: dict[str, Any], lock: RunLock | None) -> RunDir:
    """`runs_root/name`, which must not hold a run. Given the `lock` (rank 0 of a torchrun world, or a single
    process): claim the folder with it, so that a second run of the same name is refused at once, clear the
    TensorBoard events a failed start left there, and write the resolved config."""
    run = RunDir(runs_root / name)
    _refuse_if_holds_a_run(run)
    if lock is not None:
        run.path.mkdir(parents=True, exist_ok=True)
        lock.acquire(take_over=True)  # a killed start's stale lock in a folder that holds no run is no one's
        try:
            _refuse_if_holds_a_run(run)  # a run of this name may have finished since the first look
        except UserError:
            lock.release()
            raise
        clear_events(run.path)
        write_text_atomic(run.config, yaml.safe_dump(config, sort_keys=False))
    return run


def discard_unstarted(run: RunDir) -> None:
    """Remove a new run's folder when it holds nothing but its config.yaml and the TensorBoard event file of its
    start (the run stopped before training; its lock released first)."""
    if run.path.is_dir() and all(p == run.config or p.match(EVENT_FILES + RUN_START_SUFFIX)
                                 for p in run.path.iterdir()):
        clear_events(run.path)
        run.config.unlink()
        run.path.rmdir()


def existing_run_dir(path: Path) -> RunDir:
    """An existing run folder to resume; it must hold config.yaml."""
    run = RunDir(path)
    if not run.config.is_file():
        raise UserError(f"{path} is not a run folder (no config.yaml in it); pass the folder train.py created")
    return run


def default_run_name(config_path: Path) -> str:
    """`<config stem>-<date>-<time>`."""
    return f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_results(run: RunDir, results: dict[str, Any]) -> None:
    """Write results.json atomically."""
    write_text_atomic(run.results, json.dumps(results, indent=2, sort_keys=True) + "\n")
