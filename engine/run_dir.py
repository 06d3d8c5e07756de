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
        return self.path / "tensorboard"


def new_run_dir(runs_root: Path, name: str, config: dict[str, Any], create: bool = True) -> RunDir:
    """`runs_root/name`, which must not hold a run; with `create` (rank 0 of a torchrun world, or a single
    process), make it and write the resolved config into it."""
    run = RunDir(runs_root / name)
    if run.checkpoint.exists() or run.results.exists():
        raise UserError(
            f"run folder {run.path} already holds a run; continue it with --resume {run.path} "
            "or choose another name with --set name=..."
        )
    if create:
        run.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config, yaml.safe_dump(config, sort_keys=False))
    return run


def discard_unstarted(run: RunDir) -> None:
    """Remove a new run's folder when it holds nothing but its config.yaml (the run stopped before writing)."""
    if run.path.is_dir() and list(run.path.iterdir()) == [run.config]:
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
