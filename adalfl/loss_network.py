"""The learned loss: a small MLP applied output-wise to (target, prediction) pairs.

`LossMLP` is the network itself (also the building block of NPBML's task-adaptive loss);
`OutputWiseLoss` is AdaLFL's M_phi(y, f(x)) = mean over the batch and the C outputs of
l_phi(y_i, f(x)_i), evaluated in one vectorised call on a (batch * C, 2) tensor. In the residual form,
l_phi(y_i, p_i) = t(y_i, p_i) + n_phi(y_i, p_i): the task loss's own output-wise term t (cross-entropy's
-C y log p, squared error's (y - p)^2) plus a network whose output layer starts at zero, so the learned
loss starts as the task loss (as the authors' NPBML code builds its learned loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Prediction = Literal["softmax", "sigmoid", "identity"]


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
        tail = (x.abs() * -beta).exp_().add_(1.0).log_()
        return torch.add(F.leaky_relu(x, gamma), tail, alpha=(1.0 - gamma) / beta)

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

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = outputs.reshape(outputs.shape[0], -1)
        if target.dtype in (torch.int64, torch.int32) and self.prediction == "softmax":
            target = F.one_hot(target, outputs.shape[1])
        target = target.reshape(outputs.shape)
        log_prediction = outputs.log_softmax(dim=-1) if self.residual and self.prediction == "softmax" else None
        return self.pointwise(target, self.predict(outputs), log_prediction).mean()
