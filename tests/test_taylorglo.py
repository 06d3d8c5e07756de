"""TaylorGLO: the polynomial loss, the CMA-ES search on a toy problem, and a searched run that resumes exactly."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from test_train_single_task import StopAfter, run_train

import train
from adalfl.taylorglo import NUM_PARAMETERS, TaylorGLOLoss, TaylorGLOSearch

TINY = [
    "--set", "method=taylorglo", "--set", "model.name=linear", "--set", "device=cpu",
    "--set", "train.steps=12", "--set", "train.eval_every=6", "--set", "log.scalars_every=4",
    "--set", "taylorglo.population=4", "--set", "taylorglo.generations=3", "--set", "taylorglo.eval_steps=5",
]


def test_the_polynomial_is_the_papers_eight_parameter_form() -> None:
    theta = torch.randn(NUM_PARAMETERS, dtype=torch.float64)
    y, p = torch.rand(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    t0, t1, t2, t3, t4, t5, t6, t7 = theta
    dy, dp = y - t0, p - t1
    f = t2 * dp + t3 * dp**2 / 2 + t4 * dp**3 / 6 + t5 * dy * dp + t6 * dy * dp**2 / 2 + t7 * dy**2 * dp / 2
    loss = TaylorGLOLoss(theta.tolist()).double()
    assert torch.allclose(loss.pointwise(y, p), -f)
    with pytest.raises(ValueError, match="8 parameters"):
        TaylorGLOLoss([0.0] * 7)


def test_a_taylorglo_loss_can_express_squared_error_gradients() -> None:
    """theta_3 = -2, theta_5 = 2 gives p^2 - 2 y p = (p - y)^2 - y^2: the gradient of squared error."""
    outputs = torch.randn(16, 1, requires_grad=True)
    targets = torch.randn(16)
    loss = TaylorGLOLoss([0, 0, 0, -2, 0, 2, 0, 0], prediction="identity")
    (taylor,) = torch.autograd.grad(loss(outputs, targets), outputs)
    (mse,) = torch.autograd.grad(F.mse_loss(outputs.squeeze(1), targets), outputs)
    assert torch.allclose(taylor, mse, atol=1e-6)


def test_cma_es_search_finds_the_optimum_of_a_toy_problem_and_resumes_from_its_weights_only_state() -> None:
    target = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.3, 0.7]

    def fitness(theta: list[float]) -> float:
        return sum((a - b) ** 2 for a, b in zip(theta, target, strict=True))

    search = TaylorGLOSearch(population=8, sigma=1.0, seed=0)
    for _ in range(5):
        search.step(fitness)
    saved = io.BytesIO()
    torch.save(search.state_dict(), saved)
    for _ in range(35):
        search.step(fitness)
    assert search.best_fitness < 0.05 and search.generation == 40
    assert [r["generation"] for r in search.log] == list(range(1, 41))

    resumed = TaylorGLOSearch(population=8, sigma=1.0, seed=0)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for _ in range(35):
        resumed.step(fitness)
    assert resumed.log == search.log


def test_a_run_interrupted_in_the_search_resumes_where_it_stopped(tmp_path, shared_data, monkeypatch) -> None:
    assert run_train(tmp_path, shared_data, "adalfl_california", "whole", *TINY) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    search_log = json.loads((tmp_path / "whole" / "taylorglo_search.json").read_text())
    assert [r["generation"] for r in search_log] == [1, 2, 3]
    assert whole["taylorglo_theta"] == search_log[-1]["best_theta"]
    assert [r["step"] for r in whole["readouts"]] == [4, 8, 12]

    stop = StopAfter(1)  # after the first generation
    assert run_train(tmp_path, shared_data, "adalfl_california", "split", *TINY, stop=stop) == 130
    assert len(json.loads((tmp_path / "split" / "taylorglo_search.json").read_text())) == 1
    assert train.main(["--resume", str(tmp_path / "split"), "--data-root", str(shared_data)]) == 0
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert split["history"] == whole["history"] and split["taylorglo_theta"] == whole["taylorglo_theta"]
