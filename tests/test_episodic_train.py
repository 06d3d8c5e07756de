"""End-to-end episodic meta-training through train.py: each method, mini-ImageNet, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_episodes import write_mini_imagenet

import npbml.meta_trainer as meta_trainer
import train

TINY = ["model.filters=8", "data.query=2", "inner.steps=1", "outer.iterations=2", "outer.meta_batch=2",
        "eval.every=2", "eval.val_tasks=2", "eval.test_tasks=3", "log.every=1", "log.checkpoint_every=2",
        "log.progress=false", "threads=1"]


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
    assert any((folder / "tensorboard").iterdir())


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
    assert "meta-iteration 1" in err and "not finite" in err and "lower" in err
