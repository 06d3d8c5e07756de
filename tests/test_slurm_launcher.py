"""compare.py --launcher slurm without a cluster: argument checks, --dry-run's jobs (torchrun cells included), the
job function's stop-and-requeue, and a config's `processes`."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
from test_train_single_task import expect_error

import compare
import train
from engine.slurm_launcher import JobCommand, RunCommand

BASE = ["--config", "configs/adalfl_california.yaml", "--seeds", "0", "1"]


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--slurm-partition", "gpu"], "--slurm-partition applies to SLURM jobs; add --launcher slurm"),
    (["--dry-run", "--gpus-per-cell", "1"], "--gpus-per-cell, --dry-run applies to SLURM jobs"),
    (["--launcher", "slurm", "--jobs", "2", "--dry-run"], "leave --jobs out"),
    (["--launcher", "slurm", "--slurm-time", "0", "--dry-run"], "--slurm-time 0 must be at least 1"),
    (["--launcher", "slurm", "--slurm-option", "=x", "--dry-run"], "must look like NAME=VALUE or NAME"),
])
def test_slurm_options_are_checked(tmp_path, capsys, extra, fragment) -> None:
    with pytest.raises(SystemExit) as exit_:
        compare.main([*BASE, "--methods", "mse", "--out", str(tmp_path), *extra])
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


def test_slurm_without_sbatch_names_the_local_cluster_script(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit):
        compare.main([*BASE, "--methods", "mse", "--out", str(tmp_path), "--launcher", "slurm"])
    assert "needs SLURM's sbatch on PATH" in capsys.readouterr().err


def test_a_cell_asking_for_processes_is_refused_by_the_local_launcher(tmp_path, capsys) -> None:
    code = compare.main([*BASE, "--methods", "mse", "wide=mse,processes=2", "--out", str(tmp_path / "grid")])
    expect_error(capsys, code, "wide: processes = 2 runs a cell under torchrun", "--launcher slurm")
    assert not any((tmp_path / "grid").glob("*-seed*"))


def test_dry_run_prints_each_stage_s_jobs_and_submits_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "grid"
    (out / "mse@optimizer.lr=0.1-seed1").mkdir(parents=True)
    (out / "mse@optimizer.lr=0.1-seed1" / "results.json").write_text("{}")
    (out / "adalfl-seed0").mkdir()
    (out / "adalfl-seed0" / "checkpoint.pt").write_bytes(b"")
    code = compare.main([*BASE, "--methods", "mse", "adalfl", "wide=adalfl,processes=2", "--out", str(out),
                         "--sweep", "optimizer.lr=0.01,0.1", "--launcher", "slurm", "--dry-run",
                         "--slurm-partition", "gpu", "--slurm-time", "30", "--gpus-per-cell", "2",
                         "--cpus-per-cell", "4", "--slurm-option", "account=lab", "--slurm-option", "exclusive"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert not (out / "slurm").exists()
    sweep, after = printed.split("[grid] after the sweep's choice")
    assert "the sweep: 3 job(s); finished, not resubmitted: mse@optimizer.lr=0.1-seed1" in sweep
    assert ("sbatch --partition=gpu --time=30 --nodes=1 --ntasks-per-node=1 --cpus-per-task=4 --gpus-per-node=2 "
            "--account=lab --exclusive --signal=USR2@90") in sweep
    assert "job mse@optimizer.lr=0.01-seed0: OMP_NUM_THREADS=4 " in sweep and "--set optimizer.lr=0.01" in sweep
    jobs = {line.split(":")[0].strip(): line for line in after.splitlines() if line.startswith("  job ")}
    assert set(jobs) == {f"job {label}-seed{s}" for label in ("adalfl", "wide") for s in (0, 1)}
    assert f"--resume {out.resolve() / 'adalfl-seed0'} --take-over" in jobs["job adalfl-seed0"]
    assert "'optimizer.lr=<chosen>'" in jobs["job adalfl-seed1"]
    script = str(Path(train.__file__).resolve())
    assert f"OMP_NUM_THREADS=2 {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 {script} " \
           "--config" in jobs["job wide-seed0"]
    assert f"OMP_NUM_THREADS=4 {sys.executable} {script} --config" in jobs["job adalfl-seed1"]


def test_a_run_starts_or_resumes_by_its_checkpoint(tmp_path) -> None:
    run = RunCommand("cell", ("start",), ("resume",), tmp_path / "checkpoint.pt")
    assert run.current() == ("start",)
    run.checkpoint.write_bytes(b"")
    assert run.current() == ("resume",)


def test_a_warned_job_stops_its_run_and_requeues_a_fresh_job(tmp_path) -> None:
    """checkpoint() (submitit's answer to the time-limit warning) sends the run SIGTERM, waits for it and returns
    the job to requeue; the run ignores SIGUSR2 itself (SLURM sends it to every process of the job)."""
    started = tmp_path / "started"
    child = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(130)); "
             f"pathlib.Path({str(started)!r}).touch(); time.sleep(60)")
    job = JobCommand(RunCommand("cell", (sys.executable, "-c", child), ("resume",), tmp_path / "checkpoint.pt"))
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _record_failure(job, failure))
    thread.start()
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job._child is not None and started.exists()
    job._child.send_signal(signal.SIGUSR2)
    time.sleep(0.5)
    assert job._child.poll() is None  # SIGUSR2 ignored
    requeued = job.checkpoint()
    thread.join(10)
    assert job._child.returncode == 130 and "exit code 130" in str(failure[0])
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert isinstance(requeued.function, JobCommand) and requeued.function.run == job.run
    assert requeued.function._child is None


def _record_failure(job: JobCommand, failures: list[BaseException]) -> None:
    try:
        job()
    except RuntimeError as exc:
        failures.append(exc)


def test_a_config_asking_for_more_processes_than_started_is_refused(tmp_path, shared_data, capsys) -> None:
    code = train.main(["--config", "configs/adalfl_california.yaml", "--data-root", str(shared_data),
                       "--runs-root", str(tmp_path), "--set", "processes=2"])
    expect_error(capsys, code, "the config asks for processes = 2 and this run has 1",
                 "torchrun --standalone --nproc_per_node 2 train.py")
    assert not any(tmp_path.iterdir())
