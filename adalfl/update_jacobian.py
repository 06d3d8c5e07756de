"""The diagonal Jacobian of a base optimizer's update with respect to the gradient, for the one-step
meta-gradient (adalfl/online_step.py).

For the optimizers covered here the new parameters depend on the gradient g element by element:
theta' = U(theta, g, state), so d theta'/d g = -diag(D) with D computed from the optimizer's settings and
state. With v = grad L(theta'), the meta-gradient's forward-mode direction is D * v (elementwise). With
d = g + wd * theta (L2 weight decay in the gradient; AdamW's decoupled decay is free of g), step count t
after the step and the state after the step (m', v', square_avg'):

- SGD (dampening 0): D = lr (1 + momentum) with Nesterov, lr otherwise (a constant).
- Adam / AdamW: m' = b1 m + (1 - b1) d, v' = b2 v + (1 - b2) d^2, theta' = theta - lr m'/(1 - b1^t) / s,
  s = sqrt(v'/(1 - b2^t)) + eps:
      D = lr / (1 - b1^t) * [ (1 - b1) / s - m' (1 - b2) d / ((1 - b2^t) sqrt(v'/(1 - b2^t)) s^2) ]
  (the second term is 0 where v' = 0).
- RMSprop (not centered, with or without momentum): v' = a v + (1 - a) d^2, s = sqrt(v') + eps,
  theta' = theta - lr d / s (or through the momentum buffer b' = mu b + d / s, which adds nothing to D):
      D = lr * [ 1 / s - (1 - a) d^2 / (sqrt(v') s^2) ]   (second term 0 where v' = 0).

Covered: torch.optim.SGD, Adam (incl. decoupled_weight_decay), AdamW and RMSprop; foreach / fused
implementations compute the same update and are accepted. Rejected with a clear error: amsgrad, maximize,
centered RMSprop, SGD dampening, and every other optimizer (LBFGS, Adagrad, ...). `UPDATES` is the one table of
covered optimizers: another elementwise optimizer is covered by adding its `ElementwiseUpdate` there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import ConfigError

Diagonal = dict[torch.Tensor, torch.Tensor | float]  # parameter -> D (a tensor of its shape, or a scalar)
Group = dict[str, Any]


@dataclass(frozen=True)
class ElementwiseUpdate:
    """How one optimizer's update depends on the gradient: `diagonal(group, state, d)` gives D from the parameter
    group's settings, the state after the step and the step's gradient d (with L2 decay added unless
    `decoupled(group)`); `uses_gradient` False when D ignores d (the caller then keeps no copy of the gradients);
    `refused` maps a setting whose truthy value the formula does not cover to the fix the error message gives."""

    diagonal: Callable[[Group, dict[str, torch.Tensor], torch.Tensor], torch.Tensor | float]
    uses_gradient: bool = True
    decoupled: Callable[[Group], bool] = lambda group: bool(group.get("decoupled_weight_decay", False))
    refused: tuple[tuple[str, str], ...] = ()


def _sgd(group: Group, state: dict[str, torch.Tensor], d: torch.Tensor) -> float:
    lr = float(group["lr"])
    return lr * (1.0 + group["momentum"]) if group["nesterov"] else lr


def _adam(group: Group, state: dict[str, torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    bias1, bias2 = 1 - beta1**t, 1 - beta2**t
    root = (state["exp_avg_sq"] / bias2).sqrt()
    s = root + group["eps"]
    correction = torch.where(
        root > 0, state["exp_avg"] * (1 - beta2) * d / (bias2 * root.clamp_min(1e-38) * s * s), 0.0
    )
    return float(group["lr"]) / bias1 * ((1 - beta1) / s - correction)


def _rmsprop(group: Group, state: dict[str, torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    root = state["square_avg"].sqrt()
    s = root + group["eps"]
    correction = torch.where(root > 0, (1 - group["alpha"]) * d * d / (root.clamp_min(1e-38) * s * s), 0.0)
    return float(group["lr"]) * (1.0 / s - correction)


_MAXIMIZE = ("maximize", "minimise instead")
_AMSGRAD = ("amsgrad", "use amsgrad=False")
UPDATES: dict[type[torch.optim.Optimizer], ElementwiseUpdate] = {
    torch.optim.SGD: ElementwiseUpdate(
        _sgd, uses_gradient=False, refused=(_MAXIMIZE, ("dampening", "use dampening=0"))
    ),
    torch.optim.Adam: ElementwiseUpdate(_adam, refused=(_MAXIMIZE, _AMSGRAD)),
    torch.optim.AdamW: ElementwiseUpdate(_adam, decoupled=lambda group: True, refused=(_MAXIMIZE, _AMSGRAD)),
    torch.optim.RMSprop: ElementwiseUpdate(_rmsprop, refused=(_MAXIMIZE, ("centered", "use centered=False"))),
}


def elementwise_update(optimizer: torch.optim.Optimizer) -> ElementwiseUpdate:
    """The table entry of `optimizer`'s class (or its nearest covered base class); ConfigError when there is none or
    a parameter group has a setting the formula does not cover."""
    name = type(optimizer).__name__
    update = next((UPDATES[cls] for cls in type(optimizer).__mro__ if cls in UPDATES), None)
    if update is None:
        covered = ", ".join(cls.__name__ for cls in UPDATES)
        raise ConfigError(f"the online loss update needs an optimizer whose update is elementwise in the gradient "
                          f"({covered}); got {name}")
    for group in optimizer.param_groups:
        for setting, fix in update.refused:
            if group.get(setting):
                raise ConfigError(f"{name}({setting}={group[setting]}) is not covered by the online loss update; {fix}")
    return update


def update_jacobian_diagonal(
    optimizer: torch.optim.Optimizer, grads: dict[torch.Tensor, torch.Tensor], old: dict[torch.Tensor, torch.Tensor]
) -> Diagonal:
    """D for every parameter of `optimizer` that had a gradient, read after `optimizer.step()`: `grads` are the
    gradients the step used (any tensor per parameter when the update does not use them), `old` the parameters
    before it."""
    update = elementwise_update(optimizer)
    diagonal: Diagonal = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in grads:
                continue
            d = grads[p]
            if update.uses_gradient and group["weight_decay"] != 0 and not update.decoupled(group):
                d = d + group["weight_decay"] * old[p]
            diagonal[p] = update.diagonal(group, optimizer.state[p], d)
    return diagonal
