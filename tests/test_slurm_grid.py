"""compare.py --launcher slurm against a real SLURM (scripts/local_slurm.sh start): a tiny grid in which one cell
gets the time-limit warning mid-run (it is requeued and resumes) and one is killed with scancel; the grid rerun, and
its summary equal to the local launcher's on the same cells.

Skipped when sbatch is missing or no SLURM node answers; with SLURM_TEST_REQUIRED=1 (set by .ci/run, which starts
the local cluster) those are failures instead."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import compare

ROOT = Path(__file__).resolve().parent.parent
CELLS = [  # two cells long enough (about 2,000 steps) to be killed after their first checkpoints
    "train.steps=2000", "train.eval_every=500", "train.checkpoint_every=100", "meta.init_steps=3",
    "log.scalars_every=100", "log.loss_shape_every=1000", "model.name=linear", "device=cpu", "threads=1",
]
TIMING = {"compute_s", "cost"}  # wall and CPU seconds differ between any two runs


def cluster_problem() -> str | None:
    """Why no SLURM cluster can take the test's jobs, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start a local cluster: scripts/local_slurm.sh start)"
    info = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, check=False)
    if info.returncode != 0 or not {"idle", "mix", "alloc"} & set(info.stdout.split()):
        return (f"no SLURM node answers (sinfo: {(info.stdout + info.stderr).strip() or 'nothing'}); start a local "
                "cluster: scripts/local_slurm.sh start")
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = cluster_problem()
    if problem and os.environ.get("SLURM_TEST_REQUIRED") == "1":
        pytest.fail(f"SLURM_TEST_REQUIRED=1 but {problem}")
    if problem:
        pytest.skip(problem)


def grid_command(out: Path, data: Path, *launcher: str) -> list[str]:
    return [sys.executable, str(ROOT / "compare.py"), "--config", str(ROOT / "configs/adalfl_california.yaml"),
            "--methods", "mse", "adalfl", "--seeds", "0", "--out", str(out), "--data-root", str(data),
            *(arg for s in CELLS for arg in ("--set", s)), *launcher]


def summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return {row["method"]: {k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)}


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T", f"--jobs={job_id}"],
                          capture_output=True, text=True, check=False).stdout.strip()


def test_a_grid_on_slurm_survives_a_requeued_and_a_killed_cell_and_summarises_as_the_local_launcher(
        slurm, tmp_path, shared_data) -> None:
    out = tmp_path / "slurm_grid"
    warned, killed = out / "mse-seed0", out / "adalfl-seed0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen(grid_command(out, shared_data, "--launcher", "slurm"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (warned / "checkpoint.pt").is_file(), 120, "mse-seed0's first checkpoint")
        warned_id = json.loads((out / "slurm" / "jobs.json").read_text())["mse-seed0"]
        subprocess.run(["scancel", "--signal=USR2", warned_id], check=True)  # SLURM's warning before a time limit
        wait_for(lambda: (killed / "checkpoint.pt").is_file(), 120, "adalfl-seed0's first checkpoint")
        job_id = json.loads((out / "slurm" / "jobs.json").read_text())["adalfl-seed0"]
        subprocess.run(["scancel", job_id], check=True)
        wait_for(lambda: job_state(warned_id) == "PENDING", 60, "the warned job to be requeued")
        # the requeued job starts again after the cluster's cred_expire (15 s in scripts/local_slurm.sh)
        printed, _ = grid.communicate(timeout=180)
    finally:
        grid.kill()
    assert grid.returncode == 1, printed
    assert f"mse-seed0: done (job {warned_id})" in printed
    warned_log = (out / "slurm" / f"{warned_id}_0_log.out").read_text()
    assert "Requeued job" in warned_log and f"train.py --resume {warned} --take-over" in warned_log
    assert f"adalfl-seed0: failed in job {job_id}; log: {(out / 'slurm' / f'{job_id}_0_log.out').resolve()}" in printed
    assert (out / "slurm" / f"{job_id}_0_log.out").is_file()
    assert not (killed / "results.json").exists() and (killed / "checkpoint.pt").is_file()

    again = subprocess.run(grid_command(out, shared_data, "--launcher", "slurm"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "mse-seed0: finished, skipped" in again.stdout and "adalfl-seed0: resuming" in again.stdout
    assert "mse-seed0: submitted" not in again.stdout

    local = tmp_path / "local_grid"
    assert compare.main(grid_command(local, shared_data)[2:]) == 0
    assert summary(out) == summary(local)
    assert json.loads((killed / "results.json").read_text())["steps"] == 2000
