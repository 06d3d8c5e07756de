"""AdaLFL as a training component for any loop: wrap a loss network, call `step`, done.

    >>> import torch
    >>> from torch import nn
    >>> from adalfl import AdaptiveLoss
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    >>> loss = AdaptiveLoss(num_outputs=3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> stats = loss.step(model, optimizer, (x, y))  # one step of the model, then (1st of 16) one of the loss
    >>> bool(stats.finite), stats.meta_loss.shape
    (True, torch.Size([]))

`step` takes one real step of the user's model with the user's optimizer (SGD, Adam, AdamW or RMSprop, its
state and hyper-parameters as they are) on the learned loss, then updates the loss network by the exact
one-step meta-gradient of the task loss (cross-entropy or squared error) on the meta batch: the same batch
unless one is given (see README, "AdaLFL: the defaults and why"). With `update_every=k` the loss is updated at
the 1st, (k+1)-th, (2k+1)-th ... call only; the calls between are plain steps with the current learned loss (no
forward-mode product, no meta forward), so a step costs about (3 + (k - 1)) / k bare steps. It returns the step's
scalars as device tensors, so nothing waits on the device; check `stats.finite` when you read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import Batch, StepStats, online_step

Task = Literal["classification", "regression"]


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a one-output model."""
    return F.mse_loss(outputs.reshape(targets.shape), targets)


class AdaptiveLoss:
    """An output-wise learned loss M_phi, its meta optimizer (Adam) and AdaLFL's online update.

    `form="residual"` (default) is the task loss plus a network whose output layer starts at zero;
    `"network"` is the network alone. `max_grad_ratio` bounds the step's output-gradient norm at that many
    times the task loss's (None: unbounded), or with `grad_scale="match"` sets it to exactly that many times, so
    that the learned loss adapts the step's direction only; `meta_clip` clips the meta-gradient's norm; `amp` (e.g.
    torch.bfloat16) autocasts the model's forward passes, the loss and its meta-gradient staying in float32.
    `update_every=k` updates the loss at every k-th call of `step` only (default 16; 1 is the paper's every-step
    form; the calls are counted in `state_dict`).
    """

    def __init__(
        self,
        num_outputs: int,
        task: Task = "classification",
        hidden: Sequence[int] = (40, 40),
        beta: float = 2.0,
        gamma: float = 0.25,
        form: Literal["residual", "network"] = "residual",
        meta_lr: float = 1e-3,
        max_grad_ratio: float | None = 2.0,
        meta_clip: float | None = None,
        amp: torch.dtype | None = None,
        grad_scale: Literal["bound", "match"] = "bound",
        update_every: int = 16,
    ) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if grad_scale not in ("bound", "match"):
            raise ValueError(f"grad_scale must be 'bound' or 'match', got {grad_scale!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        if grad_scale == "match" and max_grad_ratio is None:
            raise ValueError("grad_scale='match' sets the step's scale to max_grad_ratio times the task loss's: "
                             "give max_grad_ratio (1.0 keeps the task loss's scale)")
        self.loss = OutputWiseLoss(
            hidden, beta, gamma, prediction="softmax" if task == "classification" else "identity",
            residual=form == "residual", num_outputs=num_outputs,
        )
        self.task_loss = F.cross_entropy if task == "classification" else regression_loss
        self.meta_optimizer = torch.optim.Adam(self.loss.parameters(), lr=meta_lr)
        self.max_grad_ratio, self.meta_clip, self.amp = max_grad_ratio, meta_clip, amp
        self.match_scale = grad_scale == "match"
        self.update_every = update_every
        self.scheduled_steps = 0  # calls of `step` that followed the update_every schedule

    @property
    def update_due(self) -> bool:
        """Whether the next `step` with `adapt=None` updates the loss."""
        return self.scheduled_steps % self.update_every == 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The learned loss's value (differentiable in the outputs)."""
        return self.loss(outputs, targets)

    def to(self, device: torch.device | str) -> AdaptiveLoss:
        self.loss.to(device)
        return self

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, meta_batch: Batch | None = None,
        adapt: bool | None = None,
    ) -> StepStats:
        """One step of `model` by `optimizer` on `batch` with the learned loss, then, when the loss is due for an
        update, one update of it from `meta_batch` (default: `batch`). `adapt=None` follows `update_every`;
        True updates the loss now (an offline meta step), False keeps it frozen (ML3's phase 2); neither counts."""
        if adapt is None:
            adapt = self.update_due
            self.scheduled_steps += 1
        meta = (self.loss, self.meta_optimizer, meta_batch if meta_batch is not None else batch) if adapt else None
        return online_step(model, self.loss, optimizer, batch, self.task_loss, meta=meta,
                           max_grad_ratio=self.max_grad_ratio, meta_clip=self.meta_clip, amp=self.amp,
                           match_scale=self.match_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "scheduled_steps": self.scheduled_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.scheduled_steps = state["scheduled_steps"]
