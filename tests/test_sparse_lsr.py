"""SparseLSR against dense label smoothing: equal value where the non-target logits are uniform, the same
minimiser in p_y, the same logit gradient there; a training run; only classification."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train_single_task import MNIST_QUICK, QUICK, expect_error, run_train

from adalfl.sparse_lsr import sparse_label_smoothing


def uniform_logits(target_logit: torch.Tensor, classes: int) -> torch.Tensor:
    """Rows whose target (class 0) logit is `target_logit` and whose other logits are 0."""
    logits = torch.zeros(len(target_logit), classes, dtype=torch.double)
    logits[:, 0] = target_logit
    return logits


@pytest.mark.parametrize(("classes", "smoothing"), [(10, 0.1), (100, 0.2), (3, 0.05)])
def test_equals_dense_label_smoothing_where_the_other_logits_are_uniform(classes, smoothing) -> None:
    target_logit = torch.linspace(-3, 12, 31, dtype=torch.double, requires_grad=True)
    targets = torch.zeros(31, dtype=torch.long)
    sparse = [sparse_label_smoothing(uniform_logits(t[None], classes), targets[:1], smoothing) for t in target_logit]
    dense = [F.cross_entropy(uniform_logits(t[None], classes), targets[:1], label_smoothing=smoothing)
             for t in target_logit]
    torch.testing.assert_close(torch.stack(sparse), torch.stack(dense))
    for t in target_logit.detach()[::6]:  # the gradient w.r.t. the logits too
        logits = uniform_logits(t[None], classes).requires_grad_()
        (gs,) = torch.autograd.grad(sparse_label_smoothing(logits, targets[:1], smoothing), logits)
        (gd,) = torch.autograd.grad(F.cross_entropy(logits, targets[:1], label_smoothing=smoothing), logits)
        torch.testing.assert_close(gs, gd)


def test_the_minimiser_is_the_smoothed_target_and_not_the_clamp() -> None:
    classes, smoothing = 10, 0.1
    target_logit = torch.linspace(-2, 20, 4401, dtype=torch.double)
    logits = uniform_logits(target_logit, classes)
    values = torch.stack([sparse_label_smoothing(row[None], torch.zeros(1, dtype=torch.long), smoothing)
                          for row in logits])
    p_best = logits[values.argmin()].softmax(-1)[0].item()
    assert p_best == pytest.approx(1 - smoothing + smoothing / classes, abs=2e-3)
    dense = F.cross_entropy(logits[values.argmin()][None], torch.zeros(1, dtype=torch.long), label_smoothing=0.1)
    assert values.min().item() == pytest.approx(dense.item(), rel=1e-9)


def test_sparse_lsr_trains_through_train_py_and_needs_classes(tmp_path, shared_data, capsys) -> None:
    args = [*MNIST_QUICK, "--set", "method=sparse_lsr"]
    assert run_train(tmp_path, shared_data, "ce_mnist", "lsr", *args) == 0
    assert json.loads((tmp_path / "lsr" / "results.json").read_text())["test_error"] < 0.9
    code = run_train(tmp_path, shared_data, "mse_california", "bad", *QUICK, "--set", "method=sparse_lsr")
    expect_error(capsys, code, "sparse_lsr needs a classification", "use mse")
