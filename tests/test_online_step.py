"""The one-step meta-gradient against finite differences and a double-backward oracle."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adalfl import AdaptiveLoss
from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import batch_statistics_only, online_step
from adalfl.update_jacobian import update_jacobian_diagonal


def tiny_setup(nesterov: bool = True, dropout: float = 0.0, residual: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)
    ).double()
    loss_net = OutputWiseLoss(hidden=(6, 6), residual=residual, num_outputs=3).double()
    with torch.no_grad():  # a steeper loss than the default init, so the meta-gradient is far from zero
        if residual:
            loss_net.net.layers[-1].weight.normal_()
        for p in loss_net.parameters():
            p.mul_(4.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-3)
    x, y = torch.randn(16, 5, dtype=torch.double), torch.randint(0, 3, (16,))
    xv, yv = torch.randn(12, 5, dtype=torch.double), torch.randint(0, 3, (12,))
    # two warm-up steps so the momentum buffer is non-zero
    for _ in range(2):
        online_step(model, loss_net, optimizer, (x, y), F.cross_entropy)
    return model, loss_net, optimizer, (x, y), (xv, yv)


def copy_optimizer(optimizer: torch.optim.SGD, model: nn.Module) -> torch.optim.SGD:
    """An SGD over `model` with a deep copy of `optimizer`'s settings and momentum buffers."""
    settings = {k: optimizer.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    clone = torch.optim.SGD(model.parameters(), **settings)
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return clone


def closed_form(loss_net: OutputWiseLoss) -> AdaptiveLoss:
    """`loss_net` inside an AdaptiveLoss, which gives online_step its gradient in closed form."""
    adaptive = AdaptiveLoss(num_outputs=loss_net.num_outputs, max_grad_ratio=None).double()
    adaptive.loss = loss_net
    return adaptive


def meta_loss_after_step(model, loss_net, optimizer, batch, meta_batch, closed=False, **options) -> float:
    """The task loss on the meta batch after one real optimizer step of copies of everything."""
    model = copy.deepcopy(model)
    optimizer_copy = copy_optimizer(optimizer, model)
    torch.manual_seed(123)
    online_step(model, closed_form(loss_net) if closed else loss_net, optimizer_copy, batch, F.cross_entropy, **options)
    model.train()
    with torch.no_grad(), batch_statistics_only(model):
        return F.cross_entropy(model(meta_batch[0]), meta_batch[1]).item()


def analytic_meta_gradient(
    model, loss_net, optimizer, batch, meta_batch, closed=False, **options
) -> list[torch.Tensor]:
    model, loss_net = copy.deepcopy(model), copy.deepcopy(loss_net)
    optimizer_copy = copy_optimizer(optimizer, model)
    meta_optimizer = torch.optim.SGD(loss_net.parameters(), lr=0.0)
    torch.manual_seed(123)
    online_step(model, closed_form(loss_net) if closed else loss_net, optimizer_copy, batch, F.cross_entropy,
                meta=(loss_net, meta_optimizer, meta_batch), **options)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in loss_net.parameters()]


@pytest.mark.parametrize(
    ("nesterov", "dropout", "residual", "max_grad_ratio", "match_scale", "closed"),
    [(True, 0.0, False, None, False, False), (False, 0.0, False, None, False, False),
     (True, 0.3, False, None, False, False), (False, 0.3, False, None, False, False),
     (True, 0.0, True, None, False, False), (True, 0.3, True, 0.5, False, False),
     (False, 0.0, False, 0.5, False, False), (True, 0.3, True, 1.0, True, False),
     (False, 0.0, False, 3.0, True, False), (True, 0.3, False, None, False, True), (True, 0.3, True, 0.5, False, True),
     (False, 0.0, False, 0.5, False, True), (True, 0.3, True, 1.0, True, True)],
)
def test_meta_gradient_matches_finite_differences(
    nesterov, dropout, residual, max_grad_ratio, match_scale, closed
) -> None:
    """Also for the residual form, for a step whose scale bound is active (ratio 0.5 < the loss's), for a
    step whose scale is set to the ratio (`match_scale`, above and below the loss's own), and with the loss's
    gradient in closed form (`closed`: AdaptiveLoss's way)."""
    model, loss_net, optimizer, batch, meta_batch = tiny_setup(nesterov, dropout, residual)
    options = {"max_grad_ratio": max_grad_ratio, "match_scale": match_scale}
    grads = analytic_meta_gradient(model, loss_net, optimizer, batch, meta_batch, closed, **options)
    direction = [torch.randn_like(g) for g in grads]
    eps = 1e-5
    values = []
    for sign in (1, -1):
        shifted = copy.deepcopy(loss_net)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction):
                p.add_(sign * eps * d)
        values.append(meta_loss_after_step(model, shifted, optimizer, batch, meta_batch, closed, **options))
    finite_difference = (values[0] - values[1]) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    assert analytic == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)
    assert abs(analytic) > 1e-6  # the check is not vacuous


@pytest.mark.parametrize("closed", [False, True])
def test_meta_gradient_matches_double_backward_through_the_sgd_rule(closed: bool) -> None:
    """Oracle: unroll torch.optim.SGD's rule by hand with create_graph and differentiate twice."""
    model, loss_net, optimizer, (x, y), (xv, yv) = tiny_setup(nesterov=True)
    grads = analytic_meta_gradient(model, loss_net, optimizer, (x, y), (xv, yv), closed)

    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    lr, mu, wd = 0.1, 0.9, 5e-3
    model.train()
    outputs = functional_call(model, {**params, **buffers}, (x,))
    g = torch.autograd.grad(loss_net(outputs, y), list(params.values()), create_graph=True)
    new_params = {}
    for (name, p), grad in zip(params.items(), g):
        d = grad + wd * p.detach()
        buf = mu * optimizer.state[p]["momentum_buffer"] + d
        new_params[name] = p.detach() - lr * (d + mu * buf)
    with batch_statistics_only(model):
        meta_loss = F.cross_entropy(functional_call(model, {**new_params, **buffers}, (xv,)), yv)
    oracle = torch.autograd.grad(meta_loss, list(loss_net.parameters()), allow_unused=True, materialize_grads=True)
    for a, b in zip(grads, oracle):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_sgd_diagonal_follows_the_optimizer_settings() -> None:
    p = nn.Parameter(torch.zeros(1))
    grads, old = {p: p}, {p: p.detach()}
    for settings, expected in [({"momentum": 0.9, "nesterov": True}, 0.19), ({"momentum": 0.9}, 0.1), ({}, 0.1)]:
        optimizer = torch.optim.SGD([p], lr=0.1, **settings)
        assert update_jacobian_diagonal(optimizer, grads, old)[p] == pytest.approx(expected)


def test_the_scale_bound_caps_the_step_at_the_ratio_times_the_task_loss() -> None:
    """A loss 5x cross-entropy bounded at ratio 2 steps exactly like 2x cross-entropy; below the bound
    (ratio 8) it is untouched."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.double), torch.randint(0, 3, (16,))

    def params_after(scale: float, max_grad_ratio: float | None) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        for _ in range(3):
            online_step(model, lambda o, t: scale * F.cross_entropy(o, t), optimizer, (x, y), F.cross_entropy,
                        max_grad_ratio=max_grad_ratio)
        return [p.detach() for p in model.parameters()]

    for bounded, expected in zip(params_after(5.0, 2.0), params_after(2.0, None), strict=True):
        torch.testing.assert_close(bounded, expected)
    for unbounded, expected in zip(params_after(5.0, 8.0), params_after(5.0, None), strict=True):
        torch.testing.assert_close(unbounded, expected)


def test_a_matched_scale_sets_the_step_to_the_ratio_times_the_task_loss() -> None:
    """With `match_scale` a loss 0.3x or 5x cross-entropy steps exactly like 2x cross-entropy at ratio 2."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.double), torch.randint(0, 3, (16,))

    def params_after(scale: float, **options) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        for _ in range(3):
            online_step(model, lambda o, t: scale * F.cross_entropy(o, t), optimizer, (x, y), F.cross_entropy,
                        **options)
        return [p.detach() for p in model.parameters()]

    expected = params_after(2.0)
    for scale in (0.3, 5.0):
        for matched, reference in zip(params_after(scale, max_grad_ratio=2.0, match_scale=True), expected, strict=True):
            torch.testing.assert_close(matched, reference)
    with pytest.raises(ValueError, match="give max_grad_ratio"):
        params_after(1.0, match_scale=True)


def test_meta_gradient_clipping_bounds_the_loss_network_update() -> None:
    model, loss_net, optimizer, batch, meta_batch = tiny_setup()
    free = analytic_meta_gradient(model, loss_net, optimizer, batch, meta_batch)
    free_norm = torch.sqrt(sum(g.pow(2).sum() for g in free)).item()
    assert free_norm > 1e-4
    clipped = analytic_meta_gradient(model, loss_net, optimizer, batch, meta_batch, meta_clip=free_norm / 10)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in clipped)).item()
    assert norm == pytest.approx(free_norm / 10, rel=1e-2)  # clip_grad_norm_ divides by norm + 1e-6
    for a, b in zip(free, clipped, strict=True):  # same direction
        torch.testing.assert_close(a / free_norm, b / norm)
