"""End-to-end episodic meta-training through train.py: each method, mini-ImageNet, resume, errors, threads."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_episodes import write_mini_imagenet
from test_hparams import read_hparams

import npbml.meta_trainer as meta_trainer
import train
from npbml.config import EpisodicConfig

TINY = ["model.filters=8", "data.query=2", "inner.steps=1", "outer.iterations=2", "outer.meta_batch=2",
        "eval.every=2", "eval.val_tasks=2", "eval.test_tasks=3", "log.every=1", "log.checkpoint_every=2",
        "log.progress=false", "threads=1", "pretrain.steps=0"]


def run(config: str, runs: Path, data_root: Path, name: str, *extra: str) -> tuple[int, Path]:
    overrides = [arg for value in (*TINY, f"name={name}", *extra) for arg in ("--set", value)]
    code = train.main(["--config", f"configs/{config}", "--runs-root", str(runs),
                       "--data-root", str(data_root), *overrides])
    return code, runs / name


@pytest.mark.slow
@pytest.mark.parametrize("config", ["maml_omniglot_5w1s.yaml", "metasgd_omniglot_5w1s.yaml",
                                    "npbml_omniglot_5w1s.yaml", "npbml_ablation_optimizer.yaml",
                                    "npbml_ablation_loss.yaml", "npbml_ablation_optimizer_loss.yaml"])
def test_each_method_meta_trains_on_omniglot(config: str, shared_data: Path, tmp_path: Path) -> None:
    code, folder = run(config, tmp_path, shared_data, "r")
    assert code == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["iterations"] == 2 and results["test_tasks"] == 3
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_ci95"] >= 0.0
    assert (folder / "best.pt").is_file() and (folder / "checkpoint.pt").is_file()
    hparams, metrics = read_hparams(folder)
    assert hparams["method"] == results["method"] and hparams["data.dataset"] == "omniglot"
    assert hparams["data.ways"] == 5 and hparams["outer.iterations"] == 2 and hparams["seed"] == 0
    assert metrics["3_test/accuracy"] == pytest.approx(results["test_accuracy"], rel=1e-6)
    assert metrics["2_val/best_accuracy"] == pytest.approx(results["best_val_accuracy"], rel=1e-6)
    if config == "npbml_omniglot_5w1s.yaml":  # does the task-adaptive loss learn: its terms' sizes and gradients
        tags = set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
        assert {"learned_loss/support_over_ce", "learned_loss/regulariser_grad_over_ce",
                "learned_loss/regulariser_meta_grad_norm"} <= tags


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_mini_imagenet_pickles_end_to_end(backbone: str, tmp_path: Path) -> None:
    write_mini_imagenet(tmp_path / "data", {"train": 6, "validation": 5, "test": 5}, per_class=5)
    code, folder = run("npbml_miniimagenet_5w5s.yaml", tmp_path / "runs", tmp_path / "data", "mini",
                       "data.shots=1", "outer.meta_batch=1", f"model.backbone={backbone}")
    assert code == 0
    assert json.loads((folder / "results.json").read_text())["method"] == "npbml"


@pytest.mark.slow
def test_resume_replays_exactly(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ("outer.iterations=4", "log.checkpoint_every=2", "eval.every=4")
    code, whole = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "whole", *extra)
    assert code == 0
    save = meta_trainer.save_checkpoint

    def interrupt_after_first_checkpoint(path: Path, state: dict) -> None:
        save(path, state)
        if path.name == "checkpoint.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(meta_trainer, "save_checkpoint", interrupt_after_first_checkpoint)
    code, parts = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "parts", *extra)
    assert code == 130 and not (parts / "results.json").exists()
    monkeypatch.setattr(meta_trainer, "save_checkpoint", save)
    assert train.main(["--resume", str(parts), "--data-root", str(shared_data)]) == 0
    first, second = (torch.load(f / "checkpoint.pt", weights_only=False) for f in (whole, parts))
    assert first["state"]["iteration"] == second["state"]["iteration"] == 4
    for key, value in first["learner"].items():
        assert torch.equal(value, second["learner"][key]), key
    results = [json.loads((f / "results.json").read_text()) for f in (whole, parts)]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(shared_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "old")
    assert code == 0
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
    checkpoint["learner"] = {k.replace("blocks.", "units."): v for k, v in checkpoint["learner"].items()}
    torch.save(checkpoint, folder / "checkpoint.pt")
    assert train.main(["--resume", str(folder), "--data-root", str(shared_data)]) == 2
    assert "does not fit this run's model" in capsys.readouterr().err


def test_missing_data_and_bad_config_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _ = run("npbml_omniglot_5w1s.yaml", tmp_path, tmp_path / "nowhere", "missing")
    assert code == 2 and "Omniglot not found" in capsys.readouterr().err
    code, _ = run("npbml_omniglot_5w1s.yaml", tmp_path, tmp_path, "bad", "inner.steps=0")
    assert code == 2 and "inner.steps = 0 must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_non_finite_meta_gradient_is_reported(shared_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    code, folder = run("maml_omniglot_5w1s.yaml", tmp_path, shared_data, "nan", "inner.lr=1e30")
    assert code == 2
    err = capsys.readouterr().err
    assert "meta-iteration 1;" in err and "non-finite" in err and "lower" in err


def expect_one_line_error(capsys: pytest.CaptureFixture, code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize(("override", "fragment"), [
    ("data.ways=5000", "data.ways = 5000 but the omniglot meta-validation split has 172 classes (classes per "
                       "split: meta-train 1028, meta-validation 172, meta-test 423); set data.ways to at most 172"),
    ("data.shots=30", "data.shots + data.query = 30 + 2 = 32 examples per class, but a class of the omniglot "
                      "meta-train split has only 20"),
])
def test_episodes_omniglot_cannot_supply_stop_before_the_run_folder(
        override: str, fragment: str, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "too-big", override)
    expect_one_line_error(capsys, code, fragment)
    assert not folder.exists()


def test_episodes_mini_imagenet_cannot_supply_stop_before_the_run_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mini_imagenet(tmp_path / "data", {"train": 8, "validation": 4, "test": 6}, per_class=5)
    code, folder = run("maml_omniglot_5w1s.yaml", tmp_path / "runs", tmp_path / "data", "too-big",
                       "data.dataset=mini_imagenet")
    expect_one_line_error(capsys, code, "data.ways = 5 but the mini_imagenet meta-validation split has 4 classes")
    assert not folder.exists()
    code, folder = run("maml_omniglot_5w1s.yaml", tmp_path / "runs", tmp_path / "data", "too-big",
                       "data.dataset=mini_imagenet", "data.ways=3", "data.shots=4")
    expect_one_line_error(capsys, code, "4 + 2 = 6 examples per class")
    assert not folder.exists() and not any((tmp_path / "runs").iterdir())


def test_threads_are_set_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    seen = []

    def record_threads(*args, **kwargs) -> dict:
        seen.append(torch.get_num_threads())
        return {}

    record = replace(train.FAMILIES[1], train=record_threads)
    assert record.schema is EpisodicConfig
    monkeypatch.setattr(train, "FAMILIES", (train.FAMILIES[0], record))
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, tmp_path, f"t{threads}", f"threads={threads}")
            assert code == 0 and f"threads: {threads}" in (folder / "config.yaml").read_text()
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]
    code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, tmp_path, "t0", "threads=0")
    expect_one_line_error(capsys, code, "threads = 0 must be at least 1")
    assert not folder.exists()


def test_an_episodic_run_prints_its_device_estimate_and_at_a_stop_the_command_that_continues_it(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_train_single_task import StopAfter

    overrides = [arg for value in (*TINY, "name=stopped", "outer.iterations=14", "eval.every=7")
                 for arg in ("--set", value)]
    code = train.main(["--config", "configs/maml_omniglot_5w1s.yaml", "--runs-root", str(tmp_path),
                       "--data-root", str(shared_data), *overrides], StopAfter(13))
    out = capsys.readouterr()
    folder = tmp_path / "stopped"
    assert code == 130 and f"run folder: {folder} (new;" in out.out and "maml on cpu" in out.out
    assert re.search(r"estimate on cpu: \d+ meta-iterations ~", out.out), out.out
    assert "1 meta-validations of 2 tasks ~" in out.out and "meta-test on 3 tasks ~" in out.out
    assert f"continue with python train.py --resume {folder}\n" in out.err, out.err
