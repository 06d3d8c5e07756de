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
centered RMSprop, SGD dampening, and every other optimizer (LBFGS, Adagrad, ...).
"""

from __future__ import annotations

import torch

from engine.errors import ConfigError

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
Diagonal = dict[torch.Tensor, torch.Tensor | float]  # parameter -> D (a tensor of its shape, or a scalar)


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise ConfigError unless the one-step meta-gradient covers `optimizer` with its current settings."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, SUPPORTED):
        raise ConfigError(f"the online loss update needs an optimizer whose update is elementwise in the gradient "
                          f"(SGD, Adam, AdamW, RMSprop); got {name}")
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ConfigError(f"{name}(maximize=True) is not covered by the online loss update; minimise instead")
        if group.get("amsgrad", False):
            raise ConfigError(f"{name}(amsgrad=True) is not covered by the online loss update; use amsgrad=False")
        if group.get("centered", False):
            raise ConfigError("RMSprop(centered=True) is not covered by the online loss update; use centered=False")
        if isinstance(optimizer, torch.optim.SGD) and group["dampening"] != 0:
            raise ConfigError("SGD(dampening != 0) is not covered by the online loss update; use dampening=0")


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def update_jacobian_diagonal(
    optimizer: torch.optim.Optimizer, grads: dict[torch.Tensor, torch.Tensor], old: dict[torch.Tensor, torch.Tensor]
) -> Diagonal:
    """D for every parameter of `optimizer` that had a gradient, read after `optimizer.step()`: `grads` are the
    gradients the step used, `old` the parameters before it."""
    diagonal: Diagonal = {}
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            if p not in grads:
                continue
            if isinstance(optimizer, torch.optim.SGD):
                diagonal[p] = lr * (1.0 + group["momentum"]) if group["nesterov"] else lr
                continue
            state = optimizer.state[p]
            d = grads[p]
            if group["weight_decay"] != 0 and not _decoupled(optimizer, group):
                d = d + group["weight_decay"] * old[p]
            if isinstance(optimizer, torch.optim.RMSprop):
                root = state["square_avg"].sqrt()
                s = root + group["eps"]
                correction = torch.where(root > 0, (1 - group["alpha"]) * d * d / (root.clamp_min(1e-38) * s * s), 0.0)
                diagonal[p] = lr * (1.0 / s - correction)
                continue
            beta1, beta2 = group["betas"]
            t = float(state["step"])
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            root = (state["exp_avg_sq"] / bias2).sqrt()
            s = root + group["eps"]
            correction = torch.where(
                root > 0, state["exp_avg"] * (1 - beta2) * d / (bias2 * root.clamp_min(1e-38) * s * s), 0.0
            )
            diagonal[p] = lr / bias1 * ((1 - beta1) / s - correction)
    return diagonal
