"""The analysis readouts: gradient-norm ratio and argmin_p l(1, p), as functions and as logged by a run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train_single_task import QUICK, run_train, scalar_tags
from torch import nn

from adalfl.analysis import argmin_prediction, gradient_norm_ratio, loss_shape
from adalfl.taylorglo import TaylorGLOLoss


def test_gradient_norm_ratio_measures_the_loss_scale_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    batch = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    running = model[1].running_mean.clone()
    rng = torch.get_rng_state()

    def double_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 2 * F.cross_entropy(outputs, targets)

    assert gradient_norm_ratio(model, F.cross_entropy, F.cross_entropy, batch) == pytest.approx(1.0, rel=1e-6)
    assert gradient_norm_ratio(model, double_ce, F.cross_entropy, batch) == pytest.approx(2.0, rel=1e-6)
    # the step as taken: the scale bound of online_step applies
    assert gradient_norm_ratio(model, double_ce, F.cross_entropy, batch, 1.5) == pytest.approx(1.5, rel=1e-6)
    assert gradient_norm_ratio(model, double_ce, F.cross_entropy, batch, 3.0) == pytest.approx(2.0, rel=1e-6)
    # a matched scale is the ratio itself, above or below the loss's own
    assert gradient_norm_ratio(model, double_ce, F.cross_entropy, batch, 3.0, True) == pytest.approx(3.0, rel=1e-6)
    assert gradient_norm_ratio(model, double_ce, F.cross_entropy, batch, 1.0, True) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(model[1].running_mean, running) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_argmin_of_the_loss_shape_is_where_the_loss_for_y1_is_lowest() -> None:
    # l(1, p) = (p - 0.8)^2 / 2 up to p-free terms: theta_1 = 0.8, theta_3 = -1, theta_5 = 0
    shape = loss_shape(TaylorGLOLoss([0, 0.8, 0, -1, 0, 0, 0, 0]))
    assert argmin_prediction(shape) == pytest.approx(0.8, abs=1e-6)
    assert argmin_prediction({"prediction": [0.0, 0.5, 1.0], "y=1": [3.0, 2.0, 1.0]}) == 1.0


@pytest.mark.parametrize("method", ["adalfl", "ml3", "adalfl,meta.grad_scale=match"])
def test_learned_loss_runs_log_the_readouts_at_the_scalar_cadence(tmp_path, shared_data, method) -> None:
    method, *settings = method.split(",")
    args = [*QUICK, "--set", f"method={method}", "--set", "model.name=linear"]
    args += [a for setting in settings for a in ("--set", setting)]
    assert run_train(tmp_path, shared_data, "adalfl_california", "run", *args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["step"] for r in results["readouts"]] == [4, 8, 12, 16, 20, 24]
    assert all(r["grad_norm_ratio"] > 0 and -2 <= r["argmin_p_y1"] <= 3 for r in results["readouts"])
    assert {"analysis/grad_norm_ratio", "analysis/argmin_p_y1"} <= scalar_tags(tmp_path / "run")


def test_handcrafted_runs_have_no_readouts(tmp_path, shared_data) -> None:
    args = [*QUICK, "--set", "method=mse", "--set", "model.name=linear"]
    assert run_train(tmp_path, shared_data, "adalfl_california", "run", *args) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["readouts"] == []


def test_phase_1_records_what_the_first_online_step_would_see(tmp_path, shared_data) -> None:
    from test_train_single_task import MNIST_QUICK

    assert run_train(tmp_path, shared_data, "adalfl_mnist", "run", *MNIST_QUICK) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["step"] for r in results["init_readouts"]] == [4]  # 6 offline steps, scalars every 4
    assert all(r["grad_norm_ratio"] > 0 and 0.1 <= r["confidence"] <= 1 for r in results["init_readouts"])
    assert all(0.1 <= r["confidence"] <= 1 for r in results["readouts"])
    assert {"phase1/grad_norm_ratio", "phase1/confidence"} <= scalar_tags(tmp_path / "run" / "phase1")
