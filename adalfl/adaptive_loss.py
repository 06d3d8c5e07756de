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

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalfl.loss_network import OutputWiseLoss, closed_form_gradients
from adalfl.online_step import Batch, StepStats, online_step

Task = Literal["classification", "regression"]


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a one-output model."""
    return F.mse_loss(outputs.reshape(targets.shape), targets)


SETTINGS = ("num_outputs", "task", "hidden", "beta", "gamma", "form", "max_grad_ratio", "grad_scale", "update_every")


class AdaptiveLoss(nn.Module):
    """An output-wise learned loss M_phi, its meta optimizer (Adam) and AdaLFL's online update, as a module: its
    `parameters()` are the loss network's, `.to()` moves them (and the meta optimizer's state) to a device or dtype,
    and calling it gives the learned loss's value.

    `form="residual"` (default) is the task loss plus a network whose output layer starts at zero;
    `"network"` is the network alone. `max_grad_ratio` bounds the step's output-gradient norm at that many
    times the task loss's (None: unbounded), or with `grad_scale="match"` sets it to exactly that many times, so
    that the learned loss adapts the step's direction only; `meta_clip` clips the meta-gradient's norm; `amp` (e.g.
    torch.bfloat16) autocasts the model's forward passes, the loss and its meta-gradient staying in float32.
    `update_every=k` updates the loss at every k-th call of `step` only (default 16; 1 is the paper's every-step
    form; the calls are counted in `state_dict`, which also holds the settings a load must match). `keep_outputs`
    keeps the real forward's layer outputs for an update step's forward-mode product (faster, more memory until the
    product; False computes them again: adalfl/kept_outputs.py).
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
        keep_outputs: bool = True,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("task", task, ("classification", "regression")),
                                     ("form", form, ("residual", "network")), ("grad_scale", grad_scale,
                                                                                ("bound", "match"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be the model's number of outputs (a positive int), got {num_outputs!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        if grad_scale == "match" and max_grad_ratio is None:
            raise ValueError("grad_scale='match' sets the step's scale to max_grad_ratio times the task loss's: "
                             "give max_grad_ratio (1.0 keeps the task loss's scale)")
        self.settings = {"num_outputs": num_outputs, "task": task, "hidden": list(hidden), "beta": beta,
                         "gamma": gamma, "form": form, "max_grad_ratio": max_grad_ratio, "grad_scale": grad_scale,
                         "update_every": update_every}
        self.num_outputs, self.task = num_outputs, task
        self.loss = OutputWiseLoss(
            hidden, beta, gamma, prediction="softmax" if task == "classification" else "identity",
            residual=form == "residual", num_outputs=num_outputs,
        )
        self.task_loss = F.cross_entropy if task == "classification" else regression_loss
        self.meta_optimizer = torch.optim.Adam(self.loss.parameters(), lr=meta_lr)
        self.max_grad_ratio, self.meta_clip, self.amp = max_grad_ratio, meta_clip, amp
        self.match_scale = grad_scale == "match"
        self.update_every, self.keep_outputs = update_every, keep_outputs
        self.scheduled_steps = 0  # calls of `step` that followed the update_every schedule
        self._checked: set[tuple[int, int]] = set()  # (model, optimizer) pairs whose parameters were checked

    @property
    def update_due(self) -> bool:
        """Whether the next `step` with `adapt=None` updates the loss."""
        return self.scheduled_steps % self.update_every == 0

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The learned loss's value (differentiable in the outputs)."""
        return self.loss(outputs, self.checked_targets(outputs, targets))

    def closed_form_gradients(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the learned loss, its gradient in the outputs, the task loss, its gradient) in closed form, differentiable
        in the loss network's parameters under grad mode; `online_step` takes them from here (loss_network.py)."""
        return closed_form_gradients(self.loss, outputs, self.checked_targets(outputs, targets))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """`.to()`, `.double()`, `.cuda()` ... move the meta optimizer's state with the parameters."""
        super()._apply(fn, recurse)
        for state in self.meta_optimizer.state.values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value):
                    state[key] = fn(value)
        return self

    def checked_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`targets` as the losses take them: class indices as int64 [N] (any integer dtype, [N] or [N, 1]) or
        class probabilities [N, C]; regression targets as they are. One clear error otherwise."""
        if not torch.is_tensor(targets):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if outputs.dim() >= 2 and self.task == "classification" and outputs.shape[1] != self.num_outputs:
            raise ValueError(f"the model gives {outputs.shape[1]} outputs per example but the loss was built with "
                             f"num_outputs={self.num_outputs}; build AdaptiveLoss(num_outputs={outputs.shape[1]})")
        if self.task == "regression":
            return targets
        if not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool:
            if targets.dim() == 2 and targets.shape[1] == 1:
                targets = targets[:, 0]
            if targets.shape == outputs.shape[:1]:
                return targets.long()
        elif targets.is_floating_point() and targets.shape == outputs.shape:
            return targets
        raise ValueError(f"classification targets must be class indices of an integer dtype shaped [{len(outputs)}] "
                         f"(or [{len(outputs)}, 1]), or class probabilities shaped {list(outputs.shape)}; got "
                         f"{targets.dtype} shaped {list(targets.shape)}")

    def check_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
        """One clear error for a step's arguments of the wrong kind; the optimizer's hold on the model's trainable
        parameters is checked once per (model, optimizer) pair."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the nn.Module to train, got {type(model).__name__} (pass the model, not "
                            "model.parameters())")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(map(torch.is_tensor, batch))):
            raise TypeError(f"batch must be a pair of tensors (inputs, targets), got {type(batch).__name__}; unpack "
                            "a dict batch into (inputs, targets)")
        if (id(model), id(optimizer)) in self._checked:
            return
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not trainable & held:
            raise ValueError("the optimizer holds none of the model's trainable parameters: build it over "
                             "model.parameters() of the model passed to step")
        self._checked.add((id(model), id(optimizer)))

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, meta_batch: Batch | None = None,
        adapt: bool | None = None,
    ) -> StepStats:
        """One step of `model` by `optimizer` on `batch` with the learned loss, then, when the loss is due for an
        update, one update of it from `meta_batch` (default: `batch`). `adapt=None` follows `update_every`;
        True updates the loss now (an offline meta step), False keeps it frozen (ML3's phase 2); neither counts.
        Parameters that do not require gradients are left as they are; every module's train/eval mode is restored."""
        self.check_step(model, optimizer, batch)
        if adapt is None:
            adapt = self.update_due
            self.scheduled_steps += 1
        batch = self.prepared(batch)
        meta = (self.loss, self.meta_optimizer, batch if meta_batch is None else self.prepared(meta_batch)) \
            if adapt else None
        in_eval = [module for module in model.modules() if not module.training]  # e.g. a frozen batch norm
        try:  # online_step puts the whole model in train mode, if it is not
            return online_step(model, self, optimizer, batch, self.task_loss, meta=meta,
                               max_grad_ratio=self.max_grad_ratio, meta_clip=self.meta_clip, amp=self.amp,
                               match_scale=self.match_scale, keep_outputs=self.keep_outputs)
        finally:
            for module in in_eval:
                module.training = False

    def prepared(self, batch: Batch) -> Batch:
        """(inputs, targets) with the targets checked against the expected shape (the outputs' first dimension is
        the inputs')."""
        inputs, targets = batch
        shape = (len(inputs), self.num_outputs) if self.task == "classification" else (len(inputs),)
        return inputs, self.checked_targets(inputs.new_empty(shape, device="meta"), targets)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "scheduled_steps": self.scheduled_steps, "settings": dict(self.settings)}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a `state_dict` (its meta optimizer state copied, not shared); a state written with other settings
        is refused with one error naming them (a state without settings, from before they were saved, loads)."""
        saved = state.get("settings", self.settings)
        differ = {k: (saved.get(k), self.settings[k]) for k in SETTINGS if saved.get(k) != self.settings[k]}
        if differ:
            listed = ", ".join(f"{k}={a!r} (this loss: {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"this state was saved by an AdaptiveLoss with {listed}; build the loss with the saved "
                             "settings to load it")
        self.loss.load_state_dict(state["loss"])
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))
        self.scheduled_steps = state["scheduled_steps"]
