"""No path through the project prints gym's deprecation banner (learn2learn imports gym)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_episodes import write_mini_imagenet

ROOT = Path(__file__).resolve().parent.parent
# Every module that reaches learn2learn, each in a fresh interpreter (gym prints its banner once per process).
MODULES = ["tasks.episodes", "npbml", "npbml.learners", "npbml.meta_trainer", "engine.experiment", "train",
           "compare"]
LEARN2LEARN = ("from tasks.episodes import build_taskset; from tasks.image_classes import ImageClasses; "
               "import torch; "
               "build_taskset(ImageClasses(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), "
               "torch.arange(6).repeat_interleave(2)), ways=2, shots=1, query=1).sample()")


def python(*args: str) -> str:
    """stdout and stderr of `python args...` run in the repository; it must succeed."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def assert_no_gym_banner(output: str) -> None:
    assert "gym" not in output.lower(), output


@pytest.mark.parametrize("module", MODULES)
def test_importing_and_using_learn2learn_prints_no_gym_banner(module: str) -> None:
    assert_no_gym_banner(python("-c", f"import {module}; {LEARN2LEARN}"))


def test_train_help_prints_no_gym_banner() -> None:
    assert_no_gym_banner(python("train.py", "--help"))


@pytest.mark.slow
def test_an_episodic_run_prints_no_gym_banner(tmp_path: Path) -> None:
    write_mini_imagenet(tmp_path / "data", {"train": 6, "validation": 5, "test": 5}, per_class=4)
    sets = ["name=quiet", "data.dataset=mini_imagenet", "data.shots=1", "data.query=1", "model.filters=4",
            "inner.steps=1", "outer.iterations=1", "outer.meta_batch=1", "eval.every=1", "eval.val_tasks=1",
            "eval.test_tasks=1", "log.progress=false", "threads=1"]
    output = python("train.py", "--config", "configs/maml_omniglot_5w1s.yaml", "--runs-root", str(tmp_path / "runs"),
                    "--data-root", str(tmp_path / "data"), *(arg for s in sets for arg in ("--set", s)))
    assert "maml: meta-test accuracy" in output
    assert_no_gym_banner(output)
