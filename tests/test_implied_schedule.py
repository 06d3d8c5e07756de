"""The control of issue 'more than a schedule': cross-entropy trained with a learned loss's implied lr schedule."""

from __future__ import annotations

import json

import pytest
from test_train_single_task import MNIST_QUICK, expect_error, run_train

from adalfl.implied_schedule import ImpliedSchedule


def test_the_multiplier_is_the_latest_recorded_ratio_times_the_milestone_decay() -> None:
    schedule = ImpliedSchedule([50, 100, 150], [2.0, 1.5, 0.5], milestones=[120], decay=0.1)
    assert [schedule(k) for k in (0, 49, 50, 99, 100, 119)] == [2.0, 2.0, 2.0, 2.0, 1.5, 1.5]
    assert schedule(120) == pytest.approx(0.15) and schedule(10_000) == pytest.approx(0.05)


def test_cross_entropy_on_a_constant_implied_ratio_trains_like_a_scaled_learning_rate(tmp_path, shared_data) -> None:
    source = tmp_path / "source.json"
    source.write_text(json.dumps({"readouts": [{"step": 4, "grad_norm_ratio": 3.0, "argmin_p_y1": 1.0}]}))
    short = [*MNIST_QUICK, "--set", "optimizer.milestones=[]"]
    assert run_train(tmp_path, shared_data, "ce_mnist", "scaled", *short, "--set", "optimizer.lr=0.03") == 0
    assert run_train(tmp_path, shared_data, "ce_mnist", "implied", *short, "--set", "optimizer.lr=0.01",
                     "--set", f"optimizer.lr_multipliers_from={source}") == 0
    scaled, implied = (json.loads((tmp_path / n / "results.json").read_text())["history"]
                       for n in ("scaled", "implied"))
    for a, b in zip(scaled, implied, strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
    base = run_train(tmp_path, shared_data, "ce_mnist", "base", *short, "--set", "optimizer.lr=0.01")
    assert base == 0
    plain = json.loads((tmp_path / "base" / "results.json").read_text())["history"]
    assert plain[-1]["test_loss"] != pytest.approx(implied[-1]["test_loss"], rel=1e-3)


def test_a_source_without_readouts_is_one_clear_error(tmp_path, shared_data, capsys) -> None:
    source = tmp_path / "ce.json"
    source.write_text(json.dumps({"readouts": []}))
    code = run_train(tmp_path, shared_data, "ce_mnist", "bad", *MNIST_QUICK, "--set",
                     f"optimizer.lr_multipliers_from={source}")
    expect_error(capsys, code, "recorded no gradient-norm ratios")
    code = run_train(tmp_path, shared_data, "ce_mnist", "bad2", *MNIST_QUICK, "--set",
                     f"optimizer.lr_multipliers_from={tmp_path / 'missing'}")
    expect_error(capsys, code, "cannot read the readouts")
