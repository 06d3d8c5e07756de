"""The learned loss is output-wise: one small MLP on (y_i, p_i) pairs, averaged over outputs and batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from adalfl.loss_network import LossMLP, OutputWiseLoss, SmoothLeakyReLU, closed_form_gradients


def test_smooth_leaky_relu_formula() -> None:
    x = torch.linspace(-5, 5, 11)
    s = SmoothLeakyReLU(beta=2.0, gamma=0.25)(x)
    expected = [(1 - 0.25) * math.log1p(math.exp(2 * v)) / 2 + 0.25 * v for v in x.tolist()]
    torch.testing.assert_close(s, torch.tensor(expected))


def test_smooth_leaky_relu_matches_softplus_form_far_out_and_overflows_nowhere() -> None:
    x = torch.linspace(-200, 200, 40001)
    for beta, gamma in ((2.0, 0.25), (5.0, 0.25), (1.0, 0.1)):
        expected = (1 - gamma) * F.softplus(x, beta=beta) + gamma * x
        torch.testing.assert_close(SmoothLeakyReLU(beta, gamma)(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(SmoothLeakyReLU()(torch.tensor([-3e38, 3e38]))).all()


def test_smooth_leaky_relu_derivatives_are_exact_to_second_order() -> None:
    s = SmoothLeakyReLU(beta=2.0, gamma=0.25)
    x = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_()
    assert torch.autograd.gradcheck(s, (x,)) and torch.autograd.gradgradcheck(s, (x,))
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # where a formula through |x| would say gamma
    (slope,) = torch.autograd.grad(s(zero).sum(), zero, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), zero)
    torch.testing.assert_close(slope, torch.tensor([0.25 + 0.75 * 0.5], dtype=torch.float64))
    torch.testing.assert_close(curvature, torch.tensor([0.75 * 2.0 * 0.25], dtype=torch.float64))


def test_smooth_leaky_relu_under_forward_mode_and_vmap() -> None:
    s = SmoothLeakyReLU(beta=5.0, gamma=0.25)
    softplus_form = lambda v: 0.75 * F.softplus(v, beta=5.0) + 0.25 * v  # noqa: E731
    x, tangent = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jvp(s, (x,), (tangent,)), torch.func.jvp(softplus_form, (x,), (tangent,)))
    per_row = torch.func.vmap(torch.func.grad(lambda row: s(row).pow(2).sum()))(x)
    torch.testing.assert_close(per_row, torch.func.vmap(torch.func.grad(lambda r: softplus_form(r).pow(2).sum()))(x))


def test_loss_is_the_mean_of_per_output_values() -> None:
    torch.manual_seed(0)
    loss = OutputWiseLoss(hidden=(40, 40))
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    p, y = logits.softmax(-1), F.one_hot(labels, 4).float()
    per_output = torch.stack([
        torch.stack([loss.net(torch.stack((y[b, i], p[b, i]))[None])[0] for i in range(4)]) for b in range(6)
    ])
    torch.testing.assert_close(loss(logits, labels), per_output.mean())
    torch.testing.assert_close(loss(logits, labels), per_output.mean(dim=1).mean())


def test_loss_is_output_wise_one_network_call_for_all_pairs() -> None:
    loss = OutputWiseLoss()
    calls = []
    loss.net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    loss(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    assert calls == [torch.Size([80, 2])]


def test_one_output_value_depends_only_on_its_own_pair() -> None:
    loss = OutputWiseLoss(prediction="identity")
    target, prediction = torch.randn(5, 3), torch.randn(5, 3)
    base = loss.pointwise(target, prediction)
    changed = prediction.clone()
    changed[2, 1] += 1.0
    diff = loss.pointwise(target, changed) - base
    assert diff[2, 1] != 0 and (diff.flatten().count_nonzero() == 1)


def test_prediction_transforms_and_linear_output() -> None:
    logits = torch.randn(3, 5)
    assert torch.allclose(OutputWiseLoss(prediction="softmax").predict(logits), logits.softmax(-1))
    assert torch.allclose(OutputWiseLoss(prediction="sigmoid").predict(logits), logits.sigmoid())
    net = OutputWiseLoss().net
    assert isinstance(net.output_activation, torch.nn.Identity)  # no Softplus on the output
    assert [layer.out_features for layer in net.layers] == [40, 40, 1]


def test_loss_mlp_optional_normal_init_of_the_weights_keeps_the_default_biases() -> None:
    torch.manual_seed(0)
    net = LossMLP(3, (40, 40), torch.nn.ReLU, init_std=0.01)
    assert all(0 < layer.bias.abs().max() <= 1 / layer.in_features ** 0.5 for layer in net.layers)
    assert 0.005 < net.layers[1].weight.std() < 0.015


def test_residual_form_starts_as_the_task_loss_with_its_gradient() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 5, requires_grad=True), torch.randint(0, 5, (7,))
    loss = OutputWiseLoss(residual=True, num_outputs=5)
    value = loss(logits, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits, labels))
    (grad,) = torch.autograd.grad(value, logits)
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
    torch.testing.assert_close(grad, expected)
    outputs, targets = torch.randn(9, 1), torch.randn(9, 1)
    regression = OutputWiseLoss(prediction="identity", residual=True)
    torch.testing.assert_close(regression(outputs, targets), F.mse_loss(outputs, targets))


def test_residual_form_adds_the_network_to_the_task_term_pointwise() -> None:
    torch.manual_seed(0)
    loss = OutputWiseLoss(residual=True, num_outputs=10)
    with torch.no_grad():
        loss.net.layers[-1].weight.normal_()
    p = torch.linspace(0.05, 0.95, 7)
    ones = torch.ones_like(p)
    network = OutputWiseLoss(num_outputs=10)
    network.net.load_state_dict(loss.net.state_dict())
    torch.testing.assert_close(loss.pointwise(ones, p), network.pointwise(ones, p) - 10 * p.log())
    torch.testing.assert_close(loss.pointwise(0 * ones, p), network.pointwise(0 * ones, p))
    assert loss.net.layers[-1].bias.abs().max() == 0  # the network still starts at a constant zero offset


@pytest.mark.parametrize(("prediction", "soft_targets"), [("softmax", False), ("softmax", True), ("identity", False)])
@pytest.mark.parametrize("residual", [False, True])
def test_closed_form_gradients_are_autograds_to_the_last_bits(prediction, soft_targets, residual) -> None:
    """Value, gradient, task loss and its gradient as autograd gives them, and under grad mode the same derivatives
    in the loss's parameters as autograd's gradient built with create_graph (float64, a steep random network)."""
    torch.manual_seed(0)
    classes = 4 if prediction == "softmax" else 1
    loss = OutputWiseLoss(hidden=(6, 5, 7), prediction=prediction, residual=residual, num_outputs=classes).double()
    with torch.no_grad():
        for p in loss.parameters():
            p.normal_()
    outputs, tangent = torch.randn(9, classes, dtype=torch.float64), torch.randn(9, classes, dtype=torch.float64)
    if prediction == "identity":
        target = torch.randn(9, dtype=torch.float64)
    else:
        target = torch.randn(9, classes, dtype=torch.float64).softmax(-1) if soft_targets else torch.randint(0, 4, (9,))
    leaf = outputs.clone().requires_grad_()
    value = loss(leaf, target)
    (gradient,) = torch.autograd.grad(value, leaf, create_graph=True)
    task = F.cross_entropy(leaf, target) if prediction == "softmax" else F.mse_loss(leaf[:, 0], target)
    (task_gradient,) = torch.autograd.grad(task, leaf)
    meta = torch.autograd.grad(value + (tangent * gradient).sum(), list(loss.parameters()))

    closed = closed_form_gradients(loss, outputs, target)
    for mine, theirs in zip(closed, (value, gradient, task, task_gradient), strict=True):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-12, atol=1e-14)
    closed_meta = torch.autograd.grad(closed[0] + (tangent * closed[1]).sum(), list(loss.parameters()))
    for mine, theirs in zip(closed_meta, meta, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    assert min(g.abs().max() for g in meta) > 1e-3  # the comparison is not vacuous
    with torch.no_grad():
        torch.testing.assert_close(closed_form_gradients(loss, outputs, target)[1], gradient.detach())


def test_closed_form_gradients_refuse_a_loss_they_do_not_cover() -> None:
    outputs, labels = torch.randn(3, 2), torch.randint(0, 2, (3,))
    with pytest.raises(TypeError, match="sigmoid"):
        closed_form_gradients(OutputWiseLoss(prediction="sigmoid"), outputs, labels)

    class Squared(OutputWiseLoss):
        def pointwise(self, target, prediction, log_prediction=None):  # noqa: ANN001, ANN202
            return super().pointwise(target, prediction).pow(2)

    with pytest.raises(TypeError, match="Squared"):
        closed_form_gradients(Squared(), outputs, labels)
