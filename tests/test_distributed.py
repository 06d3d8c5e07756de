"""torchrun: 2 CPU processes (gloo) give what 1 process gives: the AdaLFL step and its meta-gradient, the episodic
meta-gradient, whole train.py runs, and a killed-and-resumed run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from adalfl.adaptive_loss import AdaptiveLoss
from engine import distributed
from engine.config import build_config
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from npbml.meta_trainer import meta_gradient
from tasks.episodes import Episode

REPO = Path(__file__).resolve().parent.parent
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, port: int, out: Path, *args) -> list[dict]:
    """Run `target(rank, out, *args)` in WORLD processes joined by engine.distributed (gloo); their results."""
    mp.start_processes(_worker, args=(target, port, out, *args), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _worker(rank: int, target, port: int, out: Path, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.join("cpu")
    try:
        torch.save(target(*args), out / f"rank{rank}.pt")
    finally:
        distributed.leave()


# ----- the AdaLFL step --------------------------------------------------------------------------
def _adalfl_steps(optimizer_name: str) -> dict[str, torch.Tensor]:
    """Three AdaLFL steps (bounded, same-batch meta objective) on a 16-example batch, split over the ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
                 if optimizer_name == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-2))
    loss = AdaptiveLoss(num_outputs=4, max_grad_ratio=1.5)
    with torch.no_grad():  # a non-zero correction, so the bound and the learned terms both act
        for p in loss.loss.parameters():
            p.add_(0.3 * torch.randn_like(p))
    initial = [p.detach().clone() for p in loss.loss.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss.step(model, optimizer, (distributed.shard(x), distributed.shard(y)))
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(loss.loss.parameters(), initial, strict=True))
    return {"loss_moved": torch.tensor(moved), **{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"loss.{k}": v for k, v in loss.loss.state_dict().items()}}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_adalfl_steps_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, optimizer_name) -> None:
    single = _adalfl_steps(optimizer_name)
    assert single["loss_moved"] > 1e-4
    for state in run_ranks(_adalfl_steps, free_port(), tmp_path, optimizer_name):
        for key, value in single.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ----- the episodic meta-gradient -----------------------------------------------------------------
def _episodes(count: int) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5)
    return [Episode(torch.rand(5, 1, 28, 28, generator=g), y, torch.rand(15, 1, 28, 28, generator=g),
                    y.repeat_interleave(3)) for _ in range(count)]


def _meta_gradient(method: str, vectorize: bool = False) -> dict[str, torch.Tensor]:
    config = build_config(EpisodicConfig, {"method": method, "model": {"filters": 8}, "data": {"query": 3},
                                           "inner": {"steps": 2, "lr": 0.1}, "outer": {"vectorize_tasks": vectorize}})
    torch.manual_seed(0)
    learner = build_learner(config, (1, 28, 28))
    params = [p for p in learner.parameters() if p.requires_grad]
    loss, accuracy = meta_gradient(learner, params, _episodes(4), config.inner.steps, torch.device("cpu"),
                                   vectorized=vectorize)
    return {"loss": loss.clone(), "accuracy": accuracy.clone(),  # gradients in parameter order (the
            **{f"grad {index}": p.grad for index, p in enumerate(params)}}  # names differ for a vectorised MAML)


@pytest.mark.parametrize(("method", "vectorize"), [("npbml", False), ("maml", False), ("npbml", True), ("maml", True)])
def test_a_meta_batch_split_over_two_ranks_has_the_single_process_meta_gradient(tmp_path, method, vectorize) -> None:
    single = _meta_gradient(method)  # task by task in one process; the ranks vectorise their share when asked
    scale = max(float(g.abs().max()) for k, g in single.items() if k not in ("loss", "accuracy"))
    assert scale > 0
    for state in run_ranks(_meta_gradient, free_port(), tmp_path, method, vectorize):
        for key, value in single.items():  # float tolerance relative to the gradient's scale (conv biases
            # before batch norm have a zero meta-gradient up to rounding)
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)


# ----- whole runs under torchrun ----------------------------------------------------------------
QUICK = ["--set", "device=cpu", "--set", "threads=1", "--set", "train.batch_size=64", "--set", "train.eval_every=4",
         "--set", "train.eval_batch_size=512", "--set", "log.scalars_every=2", "--set", "meta.init_steps=4"]


def train_command(processes: int, *args: str) -> list[str]:
    if processes == 1:
        return [sys.executable, str(REPO / "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(REPO / "train.py"), *args]


def run_train(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_command(processes, *args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def new_run(processes: int, root: Path, data: Path, name: str, config: str, steps: int, *extra: str):
    return run_train(processes, "--config", str(REPO / "configs" / f"{config}.yaml"), "--runs-root", str(root),
                     "--data-root", str(data), "--set", f"name={name}", "--set", f"train.steps={steps}", *QUICK,
                     *extra)


@pytest.mark.slow
@pytest.mark.parametrize(("config", "method", "metric"), [("adalfl_mnist", "ce", "test_error"),
                                                          ("adalfl_california", "adalfl", "test_mse")])
def test_two_ranks_train_like_one_process_and_record_the_world(tmp_path, shared_data, config, method, metric) -> None:
    for processes in (1, 2):
        done = new_run(processes, tmp_path, shared_data, f"p{processes}", config, 6, "--set", f"method={method}",
                       "--set", "model.name=mlp" if method == "adalfl" else "model.name=lenet5")
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"p{n}" / "checkpoint.pt", weights_only=False) for n in (1, 2))
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    if method == "adalfl":
        for key, value in one["adaptive"]["loss"].items():
            torch.testing.assert_close(two["adaptive"]["loss"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    results = [json.loads((tmp_path / f"p{n}" / "results.json").read_text()) for n in (1, 2)]
    assert [r["world_size"] for r in results] == [1, 2]
    assert results[1]["per_rank_batch_size"] == 32
    assert results[1][metric] == pytest.approx(results[0][metric], rel=1e-4, abs=1e-4)
    assert "world_size: 2" in (tmp_path / "p2" / "config.yaml").read_text()
    events = [list((tmp_path / f"p{n}").rglob("events.*")) for n in (1, 2)]
    assert len(events[1]) == len(events[0])
    assert len({f.name.split(".")[4] for f in events[1]}) == 1  # one process (rank 0) wrote them all


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


@pytest.mark.slow
def test_a_two_rank_run_stopped_on_one_rank_resumes_to_the_uninterrupted_result(tmp_path, shared_data) -> None:
    steps = ("--set", "train.checkpoint_every=2", "--set", "model.name=mlp")
    assert new_run(2, tmp_path, shared_data, "whole", "adalfl_california", 40, *steps).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--config", str(REPO / "configs" / "adalfl_california.yaml"), "--runs-root", str(tmp_path),
            "--data-root", str(shared_data), "--set", "name=split", "--set", "train.steps=40", *QUICK, *steps]
    launcher = subprocess.Popen(train_command(2, *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    workers = worker_pids(launcher)
    assert len(workers) == WORLD and checkpoint.exists()
    os.kill(workers[-1], signal.SIGTERM)  # one rank only: both stop at the same step boundary
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and not (tmp_path / "split" / "results.json").exists(), stderr[-2000:]
    assert "interrupted" in stderr
    stopped_at = torch.load(checkpoint, weights_only=False)["step"]
    assert stopped_at < 40

    mismatch = run_train(1, "--resume", str(tmp_path / "split"), "--data-root", str(shared_data))
    assert mismatch.returncode == 2 and "torchrun --nproc_per_node 2" in mismatch.stderr
    resumed = run_train(2, "--resume", str(tmp_path / "split"), "--data-root", str(shared_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, split = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "split"))
    for results in (whole, split):
        for clock in ("wall_time_s", "cpu_time_s", "compute_s"):
            results.pop(clock)
    assert split == whole


@pytest.mark.slow
def test_episodic_meta_test_under_torchrun_equals_one_process(tmp_path, shared_data) -> None:
    """Meta-test and pre-training validation (5 tasks: 3 on one rank, 2 on the other; at a negligible pre-training lr
    the blocks barely move, so both worlds validate the same blocks)."""
    extra = ["--set", "device=cpu", "--set", "threads=1", "--set", "outer.iterations=2", "--set",
             "outer.meta_batch=2", "--set", "eval.every=2", "--set", "eval.val_tasks=6", "--set",
             "eval.test_tasks=10", "--set", "model.filters=8", "--set", "pretrain.steps=2", "--set",
             "pretrain.batch_size=16", "--set", "pretrain.val_tasks=5", "--set", "pretrain.lr=1e-12"]
    for processes in (1, 2):
        done = run_train(processes, "--config", str(REPO / "configs" / "maml_omniglot_5w1s.yaml"), "--runs-root",
                         str(tmp_path), "--data-root", str(shared_data), "--set", f"name=p{processes}", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"p{n}" / "results.json").read_text()) for n in (1, 2))
    assert two["world_size"] == 2 and two["per_rank_meta_batch"] == 1
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-6)
    assert two["test_ci95"] == pytest.approx(one["test_ci95"], abs=1e-6)
    pretrained = [torch.load(tmp_path / f"p{n}" / "pretrain.pt", weights_only=False)["best"] for n in (1, 2)]
    assert pretrained[0]["step"] == pretrained[1]["step"] == 2
    assert pretrained[1]["accuracy"] == pytest.approx(pretrained[0]["accuracy"], abs=1e-6)


def test_a_batch_that_does_not_split_over_the_ranks_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "_world", distributed.World(rank=0, size=3))
    with pytest.raises(distributed.ConfigError, match="train.batch_size = 128 .* multiple of 3"):
        distributed.check_divisible(128, "examples per train batch", "train.batch_size")


def test_sync_batchnorm_on_the_cpu_is_one_clear_error(tmp_path, shared_data, monkeypatch) -> None:
    from adalfl.config import SingleTaskConfig
    from adalfl.trainer import SingleTaskTrainer
    from engine.run_dir import RunDir

    monkeypatch.setattr(distributed, "_world", distributed.World(rank=0, size=2))
    config = build_config(SingleTaskConfig, {"method": "ce", "device": "cpu", "data": {"dataset": "mnist"},
                                             "model": {"name": "lenet5"}, "train": {"sync_batchnorm": True}})
    with pytest.raises(distributed.ConfigError, match="train.sync_batchnorm needs CUDA"):
        SingleTaskTrainer(config, RunDir(tmp_path / "run"), shared_data)


def test_a_config_error_under_torchrun_is_said_once_and_each_process_exits_with_2(tmp_path, shared_data) -> None:
    done = new_run(2, tmp_path, shared_data, "odd", "mse_california", 4, "--set", "train.batch_size=127")
    assert done.stderr.count("error: train.batch_size = 127 examples per train batch do not split evenly") == 1
    ours = [line for line in done.stderr.splitlines() if f'File "{REPO}' in line and ".venv" not in line]
    assert "exitcode  : 2" in done.stderr and not ours  # torchrun's own report, no traceback of ours
    assert not (tmp_path / "odd").exists()
