"""End to end through train.py: every single-task method, run outputs, exact resume, bad input."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from adalfl.config import SingleTaskConfig

QUICK = [
    "--set", "train.steps=24", "--set", "train.eval_every=12", "--set", "train.checkpoint_every=8",
    "--set", "meta.init_steps=6", "--set", "log.scalars_every=4", "--set", "log.loss_shape_every=12",
    "--set", "device=cpu",
]
MNIST_QUICK = [*QUICK, "--set", "train.batch_size=32", "--set", "train.eval_batch_size=2000"]


def run_train(tmp_path: Path, data_root: Path, config: str, name: str, *extra: str,
              stop: StopAfter | None = None) -> int:
    return train.main([
        "--config", f"configs/{config}.yaml", "--data-root", str(data_root), "--runs-root", str(tmp_path),
        "--set", f"name={name}", *extra,
    ], stop)


def scalar_tags(folder: Path) -> set[str]:
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"]) | {f"image:{t}" for t in accumulator.Tags()["images"]}


@pytest.mark.parametrize(
    ("config", "extra", "metric"),
    [
        ("ce_mnist", MNIST_QUICK, "test_error"),
        ("ml3_mnist", MNIST_QUICK, "test_error"),
        ("adalfl_mnist", MNIST_QUICK, "test_error"),
        ("mse_california", QUICK, "test_mse"),
        ("ml3_california", QUICK, "test_mse"),
        ("adalfl_california", QUICK, "test_mse"),
    ],
)
def test_each_method_trains_and_writes_its_run_folder(tmp_path, shared_data, config, extra, metric) -> None:
    assert run_train(tmp_path, shared_data, config, "run", *extra) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 24 and results["seed"] == 0 and results["wall_time_s"] > 0
    assert 0 <= results[metric] < (1.0 if metric == "test_error" else float("inf"))
    assert [h["step"] for h in results["history"]] == [12, 24]
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 24
    assert (run / "config.yaml").read_text().startswith("method:")

    tags = scalar_tags(run)
    expected = {"1_train/task_loss", "1_train/lr", "2_val/loss", "3_test/loss", f"2_val/{metric[5:]}",
                f"3_test/{metric[5:]}"}
    if not config.startswith(("ce", "mse")):
        expected |= {"1_train/learned_loss", "image:learned_loss/shape"}
        assert {"phase1/meta_loss", "image:phase1/loss_shape"} <= scalar_tags(run / "phase1")
        shapes = json.loads((run / "loss_shapes.json").read_text())
        assert shapes[0]["phase"] == "init" and len(shapes[0]["y=1"]) == len(shapes[0]["prediction"])
    if config.startswith("adalfl"):
        expected |= {"1_train/meta_loss", "1_train/meta_grad_norm"}
    assert expected <= tags


class StopAfter:
    """A stop request handed to the run: asks it to stop after `requested` has been read `reads` times."""

    def __init__(self, reads: int) -> None:
        self.reads = reads

    @property
    def requested(self) -> bool:
        self.reads -= 1
        return self.reads == 0


@pytest.mark.parametrize(("stop_at", "update_every"), [(3, 1), (15, 1), (15, 4)],
                         ids=["in-phase-1", "in-phase-2", "in-phase-2-loss-every-4th-step"])
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, shared_data, monkeypatch, stop_at,
                                                              update_every) -> None:
    args = [*QUICK, "--set", "model.name=mlp", "--set", f"meta.update_every={update_every}"]
    assert run_train(tmp_path, shared_data, "adalfl_california", "whole", *args) == 0

    assert run_train(tmp_path, shared_data, "adalfl_california", "split", *args, stop=StopAfter(stop_at)) == 130
    assert not (tmp_path / "split" / "results.json").exists()
    assert train.main(["--resume", str(tmp_path / "split"), "--data-root", str(shared_data)]) == 0

    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert split["history"] == whole["history"]
    for key in ("test_mse", "best_val_step", "test_mse_at_best_val"):
        assert split[key] == whole[key]


def test_a_stopped_run_names_its_folder_and_the_exact_command_that_continues_it(tmp_path, shared_data,
                                                                                  capsys) -> None:
    assert run_train(tmp_path, shared_data, "mse_california", "stopped", *QUICK, stop=StopAfter(5)) == 130
    out = capsys.readouterr()
    folder = tmp_path / "stopped"
    assert f"run folder: {folder} (new;" in out.out
    command = f"python train.py --resume {folder}"
    assert f"interrupted; the last checkpoint is kept: continue with {command}\n" in out.err, out.err
    assert train.main([*command.split()[2:], "--data-root", str(shared_data)]) == 0
    assert f"run folder: {folder} (resumed;" in capsys.readouterr().out


def expect_error(capsys, code: int, *fragments: str) -> None:
    assert code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("trian.steps=5", ["unknown config key 'trian'", "did you mean 'train'"]),
        ("train.stesp=5", ["'train.stesp'", "did you mean 'train.steps'"]),
        ("train.steps=many", ["train.steps", "expected int"]),
        ("method=adalf", ["did you mean 'adalfl'", "ml3"]),
        ("model.name=resnet19", ["resnet19", "resnet18", "lenet5"]),
        ("data.dataset=cifar11", ["cifar11", "cifar10", "mnist"]),
        ("meta.batch_source=test", ["meta.batch_source", "validation"]),
        ("meta.grad_scale=exact", ["meta.grad_scale", "match"]),
        ("method=mse", ["regression", "use ce"]),
    ],
)
def test_bad_config_values_get_one_clear_message(tmp_path, shared_data, capsys, override, fragments) -> None:
    expect_error(capsys, run_train(tmp_path, shared_data, "ce_mnist", "bad", *QUICK, "--set", override), *fragments)


def test_a_matched_scale_without_a_ratio_is_refused(tmp_path, shared_data, capsys) -> None:
    code = run_train(tmp_path, shared_data, "adalfl_mnist", "bad", *QUICK, "--set", "meta.grad_scale=match",
                     "--set", "meta.max_grad_ratio=null")
    expect_error(capsys, code, "meta.grad_scale = match", "set meta.max_grad_ratio")


def test_missing_config_file_and_data_are_named(tmp_path, capsys) -> None:
    expect_error(capsys, train.main(["--config", str(tmp_path / "nope.yaml")]), "nope.yaml", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, run_train(tmp_path, empty, "ce_mnist", "nodata", *QUICK), "train-images-idx3-ubyte.gz")


def test_corrupt_data_file_is_reported(tmp_path, shared_data, capsys) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (shared_data / "MNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    code = run_train(tmp_path, tmp_path / "data", "ce_mnist", "corrupt", *QUICK)
    expect_error(capsys, code, "train-labels-idx1-ubyte.gz")


def test_a_diverging_run_stops_cleanly_and_keeps_its_last_checkpoint(tmp_path, shared_data, capsys) -> None:
    code = run_train(
        tmp_path, shared_data, "adalfl_california", "nan", *QUICK,
        "--set", "meta.init_steps=0", "--set", "train.checkpoint_every=1", "--set", "optimizer.lr=30",
    )
    expect_error(capsys, code, "non-finite", "lower meta.lr", "optimizer.lr")
    run = tmp_path / "nan"
    assert not (run / "results.json").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert code == 2


def test_the_shipped_adalfl_defaults_learn_and_keep_the_loss_scale_bounded(tmp_path, shared_data) -> None:
    """A guard against the collapse of the earlier defaults (network form, validation meta batches, no bound):
    a short MNIST run through train.py must learn, and the learned loss's step stays within its bound."""
    args = ["--set", "train.steps=300", "--set", "train.eval_every=300", "--set", "meta.init_steps=50",
            "--set", "optimizer.lr=0.1", "--set", "train.eval_batch_size=2000", "--set", "device=cpu"]
    assert run_train(tmp_path, shared_data, "adalfl_mnist", "guard", *args) == 0
    results = json.loads((tmp_path / "guard" / "results.json").read_text())
    assert results["test_error"] < 0.2  # chance is 0.9; the collapsed default stayed there
    ratios = [r["grad_norm_ratio"] for r in results["readouts"]]
    assert max(ratios) < 4.0 and min(ratios) > 0.1  # bounded at 2 in output space; parameter space may differ a little


def test_a_non_finite_stop_before_any_checkpoint_says_so_and_names_only_the_methods_settings(
        tmp_path, shared_data, capsys) -> None:
    code = run_train(tmp_path, shared_data, "mse_california", "nan", *QUICK, "--set", "optimizer.lr=1e3")
    expect_error(capsys, code, "non-finite at step", "lower optimizer.lr", "no checkpoint had been written yet")
    run = tmp_path / "nan"
    assert not (run / "results.json").exists() and not (run / "checkpoint.pt").exists()
    code = run_train(tmp_path, shared_data, "mse_california", "nan2", *QUICK, "--set", "optimizer.lr=1e3")
    assert "meta.lr" not in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop"])
def test_adalfl_trains_with_adaptive_base_optimizers_and_resumes_exactly(tmp_path, shared_data, monkeypatch,
                                                                         optimizer) -> None:
    args = [*QUICK, "--set", "model.name=mlp", "--set", f"optimizer.name={optimizer}", "--set", "optimizer.lr=1e-3",
            "--set", "optimizer.nesterov=false", "--set", f"optimizer.momentum={0.5 if optimizer == 'rmsprop' else 0}"]
    assert run_train(tmp_path, shared_data, "adalfl_california", "whole", *args) == 0
    assert run_train(tmp_path, shared_data, "adalfl_california", "split", *args, stop=StopAfter(15)) == 130
    assert train.main(["--resume", str(tmp_path / "split"), "--data-root", str(shared_data)]) == 0
    whole, split = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "split"))
    assert split["history"] == whole["history"] and whole["test_mse"] < 2.0
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    assert "exp_avg" in str(state["optimizer"]) or "square_avg" in str(state["optimizer"])


@pytest.mark.parametrize(("override", "fragment"), [
    ("optimizer.name=adam", "optimizer.nesterov is an sgd setting"),
    ("optimizer.name=lbfgs", "choose one of: sgd, adam, adamw, rmsprop"),
])
def test_optimizer_settings_that_do_not_fit_get_one_clear_message(tmp_path, shared_data, capsys, override,
                                                                  fragment) -> None:
    code = run_train(tmp_path, shared_data, "adalfl_california", "bad", *QUICK, "--set", override)
    expect_error(capsys, code, fragment)


def test_threads_sets_torch_threads_for_a_single_task_run(tmp_path, shared_data, monkeypatch) -> None:
    seen = []
    record = replace(train.FAMILIES[0], train=lambda *a, **k: seen.append(torch.get_num_threads()) or {})
    assert record.schema is SingleTaskConfig
    monkeypatch.setattr(train, "FAMILIES", (record, *train.FAMILIES[1:]))
    before = torch.get_num_threads()
    try:
        assert run_train(tmp_path, shared_data, "ce_mnist", "threads", *QUICK, "--set", "threads=2") == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [2] and "threads: 2" in (tmp_path / "threads" / "config.yaml").read_text()


def test_the_start_names_the_device_and_a_cpu_sized_config_when_the_run_would_take_days(
        tmp_path, shared_data, monkeypatch, capsys) -> None:
    code = run_train(tmp_path, shared_data, "ce_cifar", "days", "--set", "device=cpu", "--set", "model.name=lenet5",
                     "--set", "train.steps=100000000", "--set", "train.eval_every=50000000",
                     "--set", "train.checkpoint_every=100000000", stop=StopAfter(14))  # past the 12 timed steps
    assert code == 130
    out = capsys.readouterr()
    text = out.out + out.err
    assert "ce on cpu" in text
    assert "estimate on cpu: phase 2 ~" in text and "2 evaluations ~" in text
    assert "more than a day on the CPU: configs/adalfl_cifar_small.yaml is sized for a CPU; this run continues" in text
    assert Path("configs/adalfl_cifar_small.yaml").is_file()


def test_a_short_run_projects_minutes_and_gives_no_advice(tmp_path, shared_data, capsys) -> None:
    assert run_train(tmp_path, shared_data, "adalfl_mnist", "short", *MNIST_QUICK, "--set", "meta.init_steps=12") == 0
    text = "".join(capsys.readouterr())
    assert "estimate on cpu: phase 1 ~" in text and "phase 2 (at phase 1's step cost) ~" in text
    assert "more than a day" not in text


def test_a_run_that_overfits_reports_the_test_metric_at_its_best_validation_evaluation(tmp_path, shared_data) -> None:
    """2 % of California Housing for training, 600 steps: validation error turns up, and the run keeps the test
    metric at its best validation evaluation (the checkpoint a practitioner keeps) beside the final one."""
    args = ["--set", "train.steps=600", "--set", "train.eval_every=50", "--set", "data.val_fraction=0.98",
            "--set", "optimizer.lr=0.03", "--set", "train.batch_size=32", "--set", "device=cpu"]
    assert run_train(tmp_path, shared_data, "mse_california", "overfit", *args) == 0
    results = json.loads((tmp_path / "overfit" / "results.json").read_text())
    history = results["history"]
    best = min(history, key=lambda h: h["val_mse"])
    assert results["evaluations"] == 12 and results["best_val_step"] == best["step"] < 600
    assert results["best_val_mse"] == best["val_mse"] and results["test_mse_at_best_val"] == best["test_mse"]
    assert results["test_mse_at_best_val"] < results["test_mse"] - 0.02
    assert "3_test/mse_at_best_val" in scalar_tags(tmp_path / "overfit")


def test_a_non_finite_stop_names_the_phase_of_its_step(tmp_path, shared_data, capsys) -> None:
    code = run_train(tmp_path, shared_data, "adalfl_california", "nan", *QUICK, "--set", "optimizer.lr=1e30")
    expect_error(capsys, code, "non-finite at phase-1 meta step", "lower meta.lr")
    code = run_train(tmp_path, shared_data, "adalfl_california", "nan2", *QUICK, "--set", "optimizer.lr=1e3",
                     "--set", "meta.init_steps=0")
    expect_error(capsys, code, "non-finite at phase-2 step")
