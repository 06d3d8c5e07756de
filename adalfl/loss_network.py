"""The learned loss: a small MLP applied output-wise to (target, prediction) pairs.

`LossMLP` is the network itself (also the building block of NPBML's task-adaptive loss);
`OutputWiseLoss` is AdaLFL's M_phi(y, f(x)) = mean over the batch and the C outputs of
l_phi(y_i, f(x)_i), evaluated in one vectorised call on a (batch * C, 2) tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Prediction = Literal["softmax", "sigmoid", "identity"]


class SmoothLeakyReLU(nn.Module):
    """s(x) = (1 - gamma) * softplus_beta(x) + gamma * x: a leaky ReLU with a smooth elbow."""

    def __init__(self, beta: float = 2.0, gamma: float = 0.25) -> None:
        super().__init__()
        self.beta, self.gamma = beta, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.gamma) * F.softplus(x, beta=self.beta) + self.gamma * x

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
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.activations = nn.ModuleList(hidden_activation() for _ in hidden)
        self.output_activation = output_activation if output_activation is not None else nn.Identity()
        if init_std is not None:
            for layer in self.layers:
                nn.init.normal_(layer.weight, 0.0, init_std)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, activation in zip(self.layers[:-1], self.activations, strict=True):
            x = activation(layer(x))
        return self.output_activation(self.layers[-1](x)).squeeze(-1)


class OutputWiseLoss(nn.Module):
    """AdaLFL's M_phi: l_phi applied to every (y_i, p_i) pair, averaged over outputs and batch.

    `prediction` maps the model's raw outputs to the loss's inputs: softmax probabilities for
    multi-class classification, a sigmoid for a single binary output, the raw value for regression.
    Integer class targets are one-hot encoded here.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (40, 40),
        beta: float = 2.0,
        gamma: float = 0.25,
        prediction: Prediction = "softmax",
    ) -> None:
        super().__init__()
        self.prediction = prediction
        self.net = LossMLP(2, hidden, lambda: SmoothLeakyReLU(beta, gamma))

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model outputs as the loss sees them (probabilities or raw values)."""
        if self.prediction == "softmax":
            return outputs.softmax(dim=-1)
        if self.prediction == "sigmoid":
            return outputs.sigmoid()
        return outputs

    def pointwise(self, target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """l_phi(y, p) for tensors of equal shape, element by element."""
        pairs = torch.stack((target.to(prediction.dtype), prediction), dim=-1)
        return self.net(pairs.reshape(-1, 2)).reshape(prediction.shape)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = outputs.reshape(outputs.shape[0], -1)
        if target.dtype in (torch.int64, torch.int32) and self.prediction == "softmax":
            target = F.one_hot(target, outputs.shape[1])
        target = target.reshape(outputs.shape)
        return self.pointwise(target, self.predict(outputs)).mean()

