"""One run per folder: the lock taken at the start, refused second runs, stale locks and failed starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_train_single_task import QUICK, StopAfter, expect_error, run_train

import train
from engine.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_run_with_the_same_name_is_refused_while_the_first_runs(tmp_path, shared_data) -> None:
    def start(seed: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "train.py", "--config", "configs/mse_california.yaml", "--data-root", str(shared_data),
             "--runs-root", str(tmp_path), "--set", "name=same", "--set", f"seed={seed}", "--set", "device=cpu",
             "--set", "train.steps=100000", "--set", "threads=1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(0)
    lock = tmp_path / "same" / LOCK_NAME
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = start(1)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and f"is in use by process {first.pid}" in err
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 130 and not lock.exists()  # released at the stop
    assert "seed: 0\n" in (tmp_path / "same" / "config.yaml").read_text()  # nothing of the second run


def test_a_killed_runs_lock_is_stale_and_taken_over_only_on_request(tmp_path, shared_data, monkeypatch,
                                                                    capsys) -> None:
    args = [*QUICK, "--set", "model.name=mlp"]
    assert run_train(tmp_path, shared_data, "mse_california", "killed", *args, stop=StopAfter(15)) == 130
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "killed" / LOCK_NAME
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    resume = ["--resume", str(tmp_path / "killed"), "--data-root", str(shared_data)]
    expect_error(capsys, train.main(resume), "no longer runs", f"--resume {tmp_path / 'killed'} --take-over")
    assert train.main([*resume, "--take-over"]) == 0 and not lock.exists()

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))  # a live owner
    expect_error(capsys, train.main([*resume, "--take-over"]), f"is in use by process {os.getpid()}")
    assert lock.exists()

    (tmp_path / "fresh").mkdir()  # a killed start that wrote nothing but its lock: a new run takes the name
    (tmp_path / "fresh" / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert run_train(tmp_path, shared_data, "mse_california", "fresh", *args) == 0


def test_a_folder_reused_after_a_failed_start_begins_with_clean_events(tmp_path, shared_data, capsys) -> None:
    code = run_train(tmp_path, shared_data, "mse_california", "failed", *QUICK, "--set", "optimizer.lr=1e3")
    expect_error(capsys, code, "non-finite")
    events = tmp_path / "failed"
    old = set(events.rglob("*tfevents*"))
    assert old and not (tmp_path / "failed" / "checkpoint.pt").exists()
    assert run_train(tmp_path, shared_data, "mse_california", "failed", *QUICK) == 0
    assert not old & set(events.rglob("*tfevents*"))
    assert not (tmp_path / "failed" / LOCK_NAME).exists()


class Payload:
    """A pickled object of the kind a foreign checkpoint could carry."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path, shared_data, monkeypatch,
                                                                             capsys) -> None:
    assert run_train(tmp_path, shared_data, "mse_california", "foreign", *QUICK, stop=StopAfter(15)) == 130
    checkpoint = tmp_path / "foreign" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)  # the project's own checkpoint loads weights-only
    torch.save({**state, "extra": Payload()}, checkpoint)
    code = train.main(["--resume", str(tmp_path / "foreign"), "--data-root", str(shared_data)])
    expect_error(capsys, code, "holds Python objects beyond tensors and plain data", "it is refused")
    assert "this must never run" not in capsys.readouterr().out
