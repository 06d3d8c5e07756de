"""The one-step meta-gradient for Adam, AdamW and RMSprop base optimizers: against a double-backward unroll of
each optimizer's update written out here, and against finite differences; unsupported settings are refused."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import adalfl.adaptive_loss
from adalfl.adaptive_loss import AdaptiveLoss
from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import batch_statistics_only, online_step
from adalfl.update_jacobian import UPDATES, elementwise_update
from engine.errors import ConfigError

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-6, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.05),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5),
}


def setup(kind: str):
    torch.manual_seed(0)
    # no bias before the batch norm: its gradient is zero up to rounding, and where it is exactly zero, Adam's
    # sqrt(v) has no derivative and the oracle's double backward gives NaN
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_net = OutputWiseLoss(hidden=(6, 6), residual=True, num_outputs=3).double()
    with torch.no_grad():
        loss_net.net.layers[-1].weight.normal_()
    optimizer = OPTIMIZERS[kind](model.parameters())
    x, y = torch.randn(16, 5, dtype=torch.double), torch.randint(0, 3, (16,))
    meta_batch = (torch.randn(12, 5, dtype=torch.double), torch.randint(0, 3, (12,)))
    for _ in range(3):  # a non-empty optimizer state with bias corrections away from 1
        online_step(model, loss_net, optimizer, (x, y), F.cross_entropy)
    return model, loss_net, optimizer, (x, y), meta_batch


def copies(model, optimizer, kind: str):
    model_copy = copy.deepcopy(model)
    optimizer_copy = OPTIMIZERS[kind](model_copy.parameters())
    optimizer_copy.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return model_copy, optimizer_copy


def analytic(kind, model, loss_net, optimizer, batch, meta_batch) -> list[torch.Tensor]:
    model, optimizer = copies(model, optimizer, kind)
    loss_net = copy.deepcopy(loss_net)
    online_step(model, loss_net, optimizer, batch, F.cross_entropy,
                meta=(loss_net, torch.optim.SGD(loss_net.parameters(), lr=0.0), meta_batch))
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in loss_net.parameters()]


def unrolled_update(kind: str, optimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The optimizer's update of one parameter, written out with differentiable operations."""
    group, state = optimizer.param_groups[0], optimizer.state[p]
    lr, wd, eps, theta = group["lr"], group["weight_decay"], group["eps"], p.detach()
    if kind.startswith("rmsprop"):
        d = g + wd * theta
        avg = group["alpha"] * state["square_avg"] + (1 - group["alpha"]) * d * d
        step = d / (avg.sqrt() + eps)
        if group["momentum"] > 0:
            step = group["momentum"] * state["momentum_buffer"] + step
        return theta - lr * step
    beta1, beta2 = group["betas"]
    t = float(state["step"]) + 1
    decoupled = kind == "adamw"
    d = g if decoupled else g + wd * theta
    m = beta1 * state["exp_avg"] + (1 - beta1) * d
    v = beta2 * state["exp_avg_sq"] + (1 - beta2) * d * d
    base = theta * (1 - lr * wd) if decoupled else theta
    return base - lr / (1 - beta1**t) * m / ((v / (1 - beta2**t)).sqrt() + eps)


def oracle(kind, model, loss_net, optimizer, batch, meta_batch) -> list[torch.Tensor]:
    (x, y), (xv, yv) = batch, meta_batch
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    outputs = functional_call(model, {**params, **buffers}, (x,))
    grads = torch.autograd.grad(loss_net(outputs, y), list(params.values()), create_graph=True)
    new = {n: unrolled_update(kind, optimizer, p, g) for (n, p), g in zip(params.items(), grads, strict=True)}
    with batch_statistics_only(model):
        meta_loss = F.cross_entropy(functional_call(model, {**new, **buffers}, (xv,)), yv)
    return list(torch.autograd.grad(meta_loss, list(loss_net.parameters()), materialize_grads=True))


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_meta_gradient_matches_a_double_backward_unroll_of_the_optimizer(kind: str) -> None:
    model, loss_net, optimizer, batch, meta_batch = setup(kind)
    grads = analytic(kind, model, loss_net, optimizer, batch, meta_batch)
    expected = oracle(kind, model, loss_net, optimizer, batch, meta_batch)
    assert sum(float(g.abs().sum()) for g in expected) > 1e-6
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-11)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_meta_gradient_matches_finite_differences(kind: str) -> None:
    model, loss_net, optimizer, batch, meta_batch = setup(kind)
    grads = analytic(kind, model, loss_net, optimizer, batch, meta_batch)
    torch.manual_seed(5)
    direction = [torch.randn_like(g) for g in grads]
    values = []
    for sign in (1, -1):
        shifted = copy.deepcopy(loss_net)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction, strict=True):
                p.add_(sign * 1e-6 * d)
        model_copy, optimizer_copy = copies(model, optimizer, kind)
        online_step(model_copy, shifted, optimizer_copy, batch, F.cross_entropy)
        with torch.no_grad(), batch_statistics_only(model_copy):
            values.append(F.cross_entropy(model_copy(meta_batch[0]), meta_batch[1]).item())
    finite_difference = (values[0] - values[1]) / 2e-6
    assert sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True)) == pytest.approx(
        finite_difference, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad"),
    (lambda p: torch.optim.Adam(p, maximize=True), "maximize"),
    (lambda p: torch.optim.RMSprop(p, centered=True), "centered"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
    (lambda p: torch.optim.Adagrad(p), "Adagrad"),
    (lambda p: torch.optim.LBFGS(p), "LBFGS"),
])
def test_optimizers_the_meta_gradient_does_not_cover_are_refused(make, fragment: str) -> None:
    model = nn.Linear(4, 3)
    loss = AdaptiveLoss(num_outputs=3)
    with pytest.raises(ConfigError, match=fragment):
        loss.step(model, make(model.parameters()), (torch.randn(8, 4), torch.randint(0, 3, (8,))))


def test_the_component_trains_a_model_with_adamw_and_round_trips_its_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = AdaptiveLoss(num_outputs=3, update_every=1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(150):
        stats = loss.step(model, optimizer, (x, y))
    assert bool(stats.finite) and F.cross_entropy(model(x), y).item() < 0.7 * first
    assert loss.loss.net.layers[-1].weight.abs().sum() > 0  # the loss network learned
    clone = AdaptiveLoss(num_outputs=3, update_every=1)
    clone.load_state_dict(copy.deepcopy(loss.state_dict()))
    torch.testing.assert_close(clone(model(x), y), loss(model(x), y))
    assert clone.meta_optimizer.state_dict()["state"][0]["step"] == 150


def test_the_docstring_example_runs() -> None:
    assert doctest.testmod(adalfl.adaptive_loss).failed == 0


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_the_real_step_is_the_optimizers_own_step(kind: str) -> None:
    """online_step (with the meta update) moves the model exactly as loss.backward() + optimizer.step() would."""
    model, loss_net, optimizer, (x, y), meta_batch = setup(kind)
    reference, reference_optimizer = copies(model, optimizer, kind)
    reference_loss = copy.deepcopy(loss_net)
    online_step(model, loss_net, optimizer, (x, y), F.cross_entropy,
                meta=(loss_net, torch.optim.SGD(loss_net.parameters(), lr=0.0), meta_batch))
    reference_optimizer.zero_grad()
    reference_loss(reference(x), y).backward()
    reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_subclass_of_a_covered_optimizer_uses_its_base_class_formula() -> None:
    class LoggedAdam(torch.optim.Adam):
        pass

    model, loss_net, optimizer, batch, meta_batch = setup("adam")
    subclassed = LoggedAdam(model.parameters())
    subclassed.load_state_dict(optimizer.state_dict())
    assert elementwise_update(subclassed) is UPDATES[torch.optim.Adam]
    assert elementwise_update(torch.optim.AdamW(model.parameters())) is UPDATES[torch.optim.AdamW]
    assert not elementwise_update(torch.optim.SGD(model.parameters(), lr=0.1)).uses_gradient
