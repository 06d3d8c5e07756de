"""The learned loss: a small MLP applied output-wise to (target, prediction) pairs.

`LossMLP` is the network itself (also the building block of NPBML's task-adaptive loss);
`OutputWiseLoss` is AdaLFL's M_phi(y, f(x)) = mean over the batch and the C outputs of
l_phi(y_i, f(x)_i), evaluated in one vectorised call on a (batch * C, 2) tensor. In the residual form,
l_phi(y_i, p_i) = t(y_i, p_i) + n_phi(y_i, p_i): the task loss's own output-wise term t (cross-entropy's
-C y log p, squared error's (y - p)^2) plus a network whose output layer starts at zero, so the learned
loss starts as the task loss (as the authors' NPBML code builds its learned loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Prediction = Literal["softmax", "sigmoid", "identity"]
LOG2_E = 1.0 / math.log(2.0)


class SmoothLeakyReLUFunction(torch.autograd.Function):
    """s(x) = (1 - gamma) * softplus_beta(x) + gamma * x as one autograd node, computed as
    leaky_relu(x, gamma) + (1 - gamma) / beta * log(1 + exp(-beta |x|)): the same function, equal to `F.softplus`'s
    form to float32 rounding. PyTorch's CPU `log1p`, inside `F.softplus`, is not vectorised; this form takes about
    40 % of that form's time forward and half with a backward or double backward (on 1280 x 40 values, 1 thread),
    where the softplus form was about half of a plain AdaLFL step's extra cost on LeNet-5 (docs/benchmarks.md).
    The backward g * (gamma + (1 - gamma) sigmoid(beta x)) is written in differentiable operations, so that the
    meta-gradient's and NPBML's higher derivatives exist, and it holds at x = 0, where autograd through |x| would
    not; forward mode and vmap are supported."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        tail = x.abs().mul_(-beta * LOG2_E).exp2_().add_(1.0).log_()  # exp2 is 3x faster than exp on the CPU
        return F.leaky_relu(x, gamma).add_(tail, alpha=(1.0 - gamma) / beta)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd.Function's signature)
        x, ctx.beta, ctx.gamma = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def scaled(ctx, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        """grad * s'(x), differentiable in both (addcmul: a double backward keeps only the sigmoid)."""
        return torch.addcmul(grad * ctx.gamma, grad, torch.sigmoid(x * ctx.beta), value=1.0 - ctx.gamma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        return SmoothLeakyReLUFunction.scaled(ctx, ctx.saved_tensors[0], grad), None, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, *_: None) -> torch.Tensor:  # noqa: ANN001
        return SmoothLeakyReLUFunction.scaled(ctx, ctx.saved_tensors[0], tangent)

class SmoothLeakyReLU(nn.Module):
    """s(x) = (1 - gamma) * softplus_beta(x) + gamma * x: a leaky ReLU with a smooth elbow."""

    def __init__(self, beta: float = 2.0, gamma: float = 0.25) -> None:
        super().__init__()
        self.beta, self.gamma = beta, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SmoothLeakyReLUFunction.apply(x, self.beta, self.gamma)

    def slope(self, x: torch.Tensor) -> torch.Tensor:
        """s'(x) = gamma + (1 - gamma) sigmoid(beta x), differentiable."""
        return torch.mul(x, self.beta).sigmoid_().mul(1.0 - self.gamma).add_(self.gamma)  # in place where safe

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}"


class LossMLP(nn.Module):
    """Feed-forward net from `in_features` to one value per row; linear output unless given one."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        hidden_activation: Callable[[], nn.Module],
        output_activation: nn.Module | None = None,
        init_std: float | None = None,
        zero_output: bool = False,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.activations = nn.ModuleList(hidden_activation() for _ in hidden)
        self.output_activation = output_activation if output_activation is not None else nn.Identity()
        if init_std is not None:  # the weights only: the biases keep PyTorch's default
            for layer in self.layers:
                nn.init.normal_(layer.weight, 0.0, init_std)
        if zero_output:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, activation in zip(self.layers[:-1], self.activations, strict=True):
            x = activation(layer(x))
        return self.output_activation(self.layers[-1](x)).squeeze(-1)


def value_and_input_slope(net: LossMLP, x: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
    """net(x) and its derivative in x[:, column], row by row, in closed form: one forward pass that keeps each
    layer's activation slopes, then the chain rule back through the weights (differentiable in the net's parameters
    under grad mode). The net's hidden activations must be `SmoothLeakyReLU`s and its output linear (as
    `OutputWiseLoss` builds it)."""
    if not all(isinstance(a, SmoothLeakyReLU) for a in net.activations) or not isinstance(net.output_activation,
                                                                                          nn.Identity):
        raise TypeError("value_and_input_slope needs smooth leaky ReLU hidden activations and a linear output")
    graph = torch.is_grad_enabled()  # without one, the activation's bare forward and in-place products: 20 % faster
    slopes = []
    for layer, activation in zip(net.layers[:-1], net.activations, strict=True):
        before = torch.addmm(layer.bias, x, layer.weight.t())
        x = activation(before) if graph else SmoothLeakyReLUFunction.forward(before, activation.beta, activation.gamma)
        slopes.append(activation.slope(before))
    last = net.layers[-1]
    value = torch.addmm(last.bias, x, last.weight.t()).squeeze(-1)
    if not slopes:
        return value, last.weight[0, column].expand_as(value)
    back = slopes[-1] * last.weight if graph else slopes[-1].mul_(last.weight)
    for layer, slope in zip(reversed(net.layers[1:-1]), reversed(slopes[:-1]), strict=True):
        back = (back @ layer.weight) * slope if graph else (back @ layer.weight).mul_(slope)
    return value, back @ net.layers[0].weight[:, column]


class OutputWiseLoss(nn.Module):
    """AdaLFL's M_phi: l_phi applied to every (y_i, p_i) pair, averaged over outputs and batch.

    `prediction` maps the model's raw outputs to the loss's inputs: softmax probabilities for
    multi-class classification, a sigmoid for a single binary output, the raw value for regression.
    Integer class targets are one-hot encoded here. With `residual`, l_phi adds the task loss's own
    output-wise term (see the module docstring); `num_outputs` (C) scales cross-entropy's term so that
    the mean over outputs is cross-entropy itself.
    """

    residual = False

    def __init__(
        self,
        hidden: Sequence[int] = (40, 40),
        beta: float = 2.0,
        gamma: float = 0.25,
        prediction: Prediction = "softmax",
        residual: bool = False,
        num_outputs: int = 1,
    ) -> None:
        super().__init__()
        self.prediction, self.residual, self.num_outputs = prediction, residual, num_outputs
        self.net = LossMLP(2, hidden, lambda: SmoothLeakyReLU(beta, gamma), zero_output=residual)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model outputs as the loss sees them (probabilities or raw values)."""
        if self.prediction == "softmax":
            return outputs.softmax(dim=-1)
        if self.prediction == "sigmoid":
            return outputs.sigmoid()
        return outputs

    def task_term(
        self, target: torch.Tensor, prediction: torch.Tensor, log_prediction: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The task loss's output-wise term t(y, p), whose mean over outputs is the task loss; for
        classification, `log_prediction` (log-softmax of the logits) keeps it stable where p underflows."""
        target = target.to(prediction.dtype)
        if self.prediction == "identity":
            return (prediction - target).pow(2)
        if log_prediction is None:
            log_prediction = prediction.clamp_min(1e-12).log()
        if self.prediction == "softmax":
            return -self.num_outputs * target * log_prediction
        return -(target * log_prediction + (1 - target) * torch.log1p(-prediction.clamp_max(1 - 1e-7)))

    def pointwise(
        self, target: torch.Tensor, prediction: torch.Tensor, log_prediction: torch.Tensor | None = None
    ) -> torch.Tensor:
        """l_phi(y, p) for tensors of equal shape, element by element."""
        pairs = torch.stack((target.to(prediction.dtype), prediction), dim=-1)
        value = self.net(pairs.reshape(-1, 2)).reshape(prediction.shape)
        if self.residual:
            value = value + self.task_term(target, prediction, log_prediction)
        return value

    def matched_target(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`target` shaped as the [N, C] outputs (class indices one-hot encoded)."""
        if target.dtype in (torch.int64, torch.int32) and self.prediction == "softmax":
            target = F.one_hot(target, outputs.shape[1])
        return target.reshape(outputs.shape)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = outputs.reshape(outputs.shape[0], -1)
        target = self.matched_target(outputs, target)
        log_prediction = outputs.log_softmax(dim=-1) if self.residual and self.prediction == "softmax" else None
        return self.pointwise(target, self.predict(outputs), log_prediction).mean()


def closed_form_gradients(
    loss: OutputWiseLoss, outputs: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`loss`'s value, its gradient in `outputs`, the task loss, its gradient), in closed form: autograd's answer
    without its graph of the gradient. Under grad mode the value and the gradient are differentiable in the loss's
    parameters (not in `outputs`): the meta-gradient backpropagates through this once, instead of through a
    backward pass built with create_graph. On LeNet-5's 1280 pairs a plain step's loss costs about half autograd's
    and a meta step's about three quarters. The task loss is the mean of `task_term`: cross-entropy for softmax
    predictions, squared error for identity ones. `loss` must be an `OutputWiseLoss` itself (a subclass may change
    its terms) with softmax or identity predictions."""
    if type(loss) is not OutputWiseLoss or loss.prediction == "sigmoid":
        raise TypeError("closed_form_gradients covers OutputWiseLoss itself with softmax or identity predictions, "
                        f"not {type(loss).__name__} with {loss.prediction} ones: differentiate the loss instead")
    shape = outputs.shape
    outputs = outputs.detach().reshape(shape[0], -1)  # nothing below is differentiated in the outputs
    pairs = outputs.new_empty(*outputs.shape, 2)  # (y_i, p_i), written in place (one_hot checks the labels: slow)
    y, p = pairs.unbind(-1)
    if loss.prediction == "softmax" and not target.is_floating_point():
        y.zero_().scatter_(1, target.reshape(-1, 1).long(), 1.0)
    else:
        y.copy_(target.reshape(outputs.shape))
    if loss.prediction == "softmax":
        log_p = outputs.log_softmax(dim=-1)
        torch.exp(log_p, out=p)
        task_value = -(y * log_p).sum() / len(outputs)
        task_gradient = (p * y.sum(dim=-1, keepdim=True) - y).div_(len(outputs))
    else:
        p.copy_(outputs)
        task_value = (outputs - y).pow(2).mean()
        task_gradient = (outputs - y).mul_(2.0 / outputs.numel())
    values, slopes = value_and_input_slope(loss.net, pairs.reshape(-1, 2), 1)
    value, gradient = values.mean(), slopes.reshape(outputs.shape) / outputs.numel()
    if loss.prediction == "softmax":  # back through the softmax: p * (g - <g, p>)
        gradient = (gradient - (gradient * p).sum(dim=-1, keepdim=True)) * p
    if loss.residual:
        value, gradient = value + task_value, gradient + task_gradient
    return value, gradient.reshape(shape), task_value, task_gradient.reshape(shape)
