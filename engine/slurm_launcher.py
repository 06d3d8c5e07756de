"""Run folders' commands as SLURM jobs through submitit: one job per run, requeued when SLURM preempts it or its
time limit nears, and continued from the run's checkpoint.

A job runs `JobCommand`, which decides when it starts (and again after every requeue) between the run's start
command and its resume command: the resume one once the run folder holds a checkpoint. The command runs as a child
process with SIGUSR2 ignored. SIGUSR2 is submitit's advance warning before a time limit (sbatch
`--signal=USR2@90`), which SLURM sends to every process of the job: submitit's handler in the job calls
`JobCommand.checkpoint`, which sends the child SIGTERM (a run stops at the next step boundary after writing its
checkpoint; torchrun stops its workers the same way), waits for it, and hands submitit the job to requeue. On
preemption and `scancel`, SLURM sends SIGTERM to every process itself: the run writes its checkpoint and stops,
and a requeued (or resubmitted) job resumes it.

The waiting side asks `squeue`, not `sacct`, for the jobs' states, so it works on clusters without accounting
(such as scripts/local_slurm.sh's), and reattaches to a run's job that is still queued or running instead of
submitting it twice.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import submitit

MAX_TIMEOUT_REQUEUES = 10  # a run may be continued over this many time-limited jobs
CHECKPOINT_WAIT_S = 75  # of the 90 s warning: how long a stopping run may take to write its checkpoint
POLL_S = 2.0
JOBS_FILE = "jobs.json"  # in the launcher's folder: each run's latest job id
UNFINISHED = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
              "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "PREEMPTED"}


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks SLURM for: `extra` holds other sbatch options as (name, value) pairs, value "" for a
    bare flag (e.g. ("account", "lab"), ("exclusive", ""))."""

    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    extra: tuple[tuple[str, str], ...] = ()

    def executor_parameters(self, name: str) -> dict[str, object]:
        """submitit's SlurmExecutor parameters of the job named `name`."""
        parameters: dict[str, object] = {
            "job_name": name, "time": self.time_min, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": self.cpus,
            "stderr_to_stdout": True,
            "additional_parameters": {key: value or True for key, value in self.extra},
        }
        if self.partition:
            parameters["partition"] = self.partition
        if self.gpus:
            parameters["gpus_per_node"] = self.gpus
        return parameters

    def sbatch_flags(self) -> list[str]:
        """The sbatch options the jobs are submitted with, as sbatch spells them (for --dry-run)."""
        flags = [f"--partition={self.partition}"] if self.partition else []
        flags += [f"--time={self.time_min}", "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={self.cpus}"]
        flags += [f"--gpus-per-node={self.gpus}"] if self.gpus else []
        flags += [f"--{key}={value}" if value else f"--{key}" for key, value in self.extra]
        return [*flags, "--signal=USR2@90"]


@dataclass(frozen=True)
class RunCommand:
    """One run folder's job: its name, the command that starts the run and the one that resumes it (used once
    `checkpoint` exists), and the environment variables the command gets on top of the job's."""

    name: str
    start: tuple[str, ...]
    resume: tuple[str, ...]
    checkpoint: Path
    env: dict[str, str] = field(default_factory=dict)

    def current(self) -> tuple[str, ...]:
        return self.resume if self.checkpoint.is_file() else self.start


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class JobCommand(submitit.helpers.Checkpointable):
    """What a job runs: the run's current command as a child process; a non-zero exit fails the job."""

    def __init__(self, run: RunCommand) -> None:
        self.run = run
        self._child: subprocess.Popen | None = None

    def __call__(self) -> None:
        command = self.run.current()
        print(f"[slurm] {self.run.name}: {shlex.join(command)}", flush=True)
        self._child = subprocess.Popen(command, env={**os.environ, **self.run.env}, preexec_fn=_ignore_usr2)
        while (code := self._child.poll()) is None:  # polled, so that checkpoint() can run between polls
            time.sleep(1)
        if code != 0:
            raise RuntimeError(f"{self.run.name}: exit code {code}")

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Stop the run at its next step boundary (it writes its checkpoint) and requeue a fresh job of it."""
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + CHECKPOINT_WAIT_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
        return submitit.helpers.DelayedSubmission(JobCommand(self.run))


def describe(runs: Sequence[RunCommand], options: SlurmOptions) -> list[str]:
    """--dry-run's lines: each job's sbatch options, environment and command."""
    lines = [f"sbatch {' '.join(options.sbatch_flags())} (one job per cell; submitit, requeued on preemption "
             f"and time limits up to {MAX_TIMEOUT_REQUEUES} times)"]
    for run in runs:
        env = " ".join(f"{k}={v}" for k, v in run.env.items())
        lines.append(f"  job {run.name}: {env + ' ' if env else ''}{shlex.join(run.current())}")
    return lines


def squeue_states() -> dict[str, str]:
    """The state of every job slurmctld knows (finished ones for a few minutes after), by job id."""
    listed = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T"], capture_output=True,
                            text=True, check=False)
    return dict(line.split("|", 1) for line in listed.stdout.split() if "|" in line)


class SlurmLauncher:
    """Submits runs as jobs into `folder` (submitit's pickles and the jobs' logs) and waits for them."""

    def __init__(self, folder: Path, options: SlurmOptions) -> None:
        self.folder = folder
        self.options = options
        self.executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)

    def _recorded(self) -> dict[str, str]:
        path = self.folder / JOBS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record(self, name: str, job_id: str) -> None:
        path = self.folder / JOBS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self._recorded() | {name: job_id}, indent=1))
        temporary.replace(path)

    def log(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_0_log.out"

    def submit(self, run: RunCommand) -> str:
        """The job id of `run`: its recorded job when that one is still queued or running, else a new one."""
        job_id = self._recorded().get(run.name)
        if job_id is not None and squeue_states().get(job_id) in UNFINISHED:
            print(f"[grid] {run.name}: already job {job_id}, waiting for it", flush=True)
            return job_id
        self.executor.update_parameters(**self.options.executor_parameters(run.name))
        job = self.executor.submit(JobCommand(run))
        self._record(run.name, job.job_id)
        print(f"[grid] {run.name}: submitted as job {job.job_id} (log: {self.log(job.job_id)})", flush=True)
        return job.job_id

    def outcome(self, name: str, job_id: str, state: str | None) -> int | None:
        """0 when the job succeeded, 1 when it failed or ended without a result, None while it runs."""
        job: submitit.SlurmJob = submitit.SlurmJob(folder=self.folder, job_id=job_id)
        if not job.paths.result_pickle.exists():
            if state in UNFINISHED or (state is None and not self.log(job_id).exists()):
                return None
            time.sleep(POLL_S)  # a result written at the end of the job may take a moment to appear
            if not job.paths.result_pickle.exists():
                print(f"[grid] {name}: job {job_id} ended ({state or 'gone from squeue'}) without a result; "
                      f"log: {self.log(job_id)}", flush=True)
                return 1
        if job.exception() is None:
            print(f"[grid] {name}: done (job {job_id})", flush=True)
            return 0
        print(f"[grid] {name}: failed in job {job_id}; log: {self.log(job_id)}", flush=True)
        return 1

    def run(self, runs: Sequence[RunCommand]) -> list[int]:
        """Submit `runs` (or reattach to their live jobs), then wait for all of them; per run 0 (done), 1 (failed)
        or 130 (this process was interrupted; the jobs keep running and a rerun waits for them again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = [self.submit(run) for run in runs]
        codes: list[int | None] = [None] * len(runs)
        try:
            while None in codes:
                time.sleep(POLL_S)
                states = squeue_states()
                for index, (run, job_id) in enumerate(zip(runs, ids)):
                    if codes[index] is None:
                        codes[index] = self.outcome(run.name, job_id, states.get(job_id))
        except KeyboardInterrupt:
            print(f"[grid] interrupted; jobs {', '.join(i for i, c in zip(ids, codes) if c is None)} keep running "
                  "(scancel them to stop them)", flush=True)
        return [130 if code is None else code for code in codes]
