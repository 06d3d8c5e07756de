"""One base-model step with a (learned) loss, and the one-step meta-gradient of the learned loss.

The base step is the real optimizer's step (torch.optim.SGD, Adam, AdamW or RMSprop, with its state
carried across steps). For these the new parameters depend on the loss parameters phi only through the
gradient g = grad_theta M_phi(y, f_theta(X)), element by element: d theta'/d g = -diag(D), with D read
off the optimizer's settings and state (adalfl/update_jacobian.py; for SGD, D = lr (1 + momentum) with
Nesterov, lr otherwise). So the meta-gradient of the task loss L at theta' needs no double backward:

    dL/dphi = -d/dphi [ u . dM_phi(y, z)/dz ]  at z = f_theta(X),   u = J_theta f_theta(X) . (D * v),

with v = grad L(theta') and u one forward-mode product (dual tensors of torch.autograd.forward_ad)
of the model at the old parameters, in train mode with batch statistics and the same dropout
masks as the real forward. The virtual step IS the real step, and the product takes the primal outputs of the
model's linear, convolution, tanh, sigmoid, average-pooling, flatten and identity layers from the real forward
(adalfl/kept_outputs.py), computing their tangents only.

With `max_grad_ratio = r` the step's output gradient g = dM_phi/dz is bounded in scale by the task
loss's: it becomes s * g with s = min(1, r * |dL_task/dz| / |g|) (norms over the batch's outputs), so
the learned loss may steepen the step at most r times beyond the task loss's while its shape adapts
freely. s depends on phi through |g|, and the meta-gradient differentiates through it: it is the exact
one-step meta-gradient of the bounded step. With `match_scale` the step's scale is r times the task loss's
exactly (s = r * |dL_task/dz| / |g|, not capped at 1): the learned loss then sets only the step's direction.

With `amp` (e.g. torch.bfloat16) the model's two forward passes (the step's and the meta loss's) run under
autocast; the loss network, the bound and the forward-mode product stay in float32 (the product then computes
its own primal outputs: the real forward's are in the autocast's precision).

The step never waits for the device: its scalars come back as tensors, and `StepStats.finite` flags a
non-finite loss or meta-gradient for the caller to check when it reads them (NonFiniteGuard).

Under torchrun each rank holds an equal share of the batch: the model's gradient, the meta loss's gradient v and
the loss network's meta-gradient are averaged over the ranks, and the bound's norms are summed over them
(differentiably), so the step and its meta-gradient are those of the whole batch in one process.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from adalfl.kept_outputs import KeptOutputs, kept_layer_outputs, reusing
from adalfl.update_jacobian import Diagonal, elementwise_update, update_jacobian_diagonal
from engine.distributed import all_reduce_mean_, differentiable_sum

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepStats:
    """Scalars of one step as 0-dim device tensors, read (a host sync) only when logged."""

    train_loss: torch.Tensor  # the loss the model was stepped with (learned or handcrafted)
    task_loss: torch.Tensor  # the task's own loss (cross-entropy or squared error) on the same batch
    finite: torch.Tensor  # False when the training loss or the meta-gradient was not finite
    bound_scale: torch.Tensor | None = None  # s of the bound (1 where it did not cut the step; None: no bound)
    meta_loss: torch.Tensor | None = None  # task loss on the meta batch after the step
    meta_grad_norm: torch.Tensor | None = None


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Batch norm normalises with batch statistics and leaves its running statistics untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, tracked in zip(norms, saved, strict=True):
            m.track_running_stats = tracked


@contextlib.contextmanager
def replayed_rng(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run a block with the random state of an earlier point (same dropout masks), then restore."""
    devices = [torch.cuda.current_device()] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        yield


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def model_jvp(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    tangents: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    rng: dict[str, torch.Tensor],
    kept: KeptOutputs | None = None,
) -> torch.Tensor:
    """J_params model(inputs) . tangents, by forward-mode AD with dual tensors, replaying `rng`; the layers in
    `kept` take their primal outputs from there (adalfl/kept_outputs.py), unless the pass called them otherwise than
    the real forward did (a forward that branches on grad mode, say): then it runs again without them.

    torch.autograd.forward_ad under no_grad keeps about twice a plain forward pass in memory;
    torch.func.jvp kept about seven times as much on an All-CNN-C (bench/bench_online_step.py).
    """
    kept = kept if kept is not None else KeptOutputs()
    with torch.no_grad(), forward_ad.dual_level(), replayed_rng(rng), reusing(kept), warnings.catch_warnings():
        # forward-mode AD scripts a helper through torch.jit.script, whose deprecation warning means nothing here
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        duals = {name: forward_ad.make_dual(p, tangents[name]) for name, p in params.items()}
        outputs = functional_call(model, {**duals, **dict(model.named_buffers())}, (inputs,))
        tangent = forward_ad.unpack_dual(outputs).tangent
    return tangent if kept.matched else model_jvp(model, params, tangents, inputs, rng)


def to_float32(outputs: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """Autocast outputs back in float32 for the losses; without autocast, as they are (float64 stays float64)."""
    return outputs.float() if amp is not None else outputs


def output_gradient(
    loss_fn: LossFn, task_loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor, create_graph: bool,
    max_grad_ratio: float | None, match_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, its gradient in `outputs` scaled by the bound, the task loss, the bound's s or None) at the leaf
    `outputs`; the gradient keeps its graph to the loss parameters when `create_graph`. A loss with a method
    `closed_form_gradients(outputs, targets)` (AdaptiveLoss) gives the loss, its gradient and the task loss's and its
    gradient itself, differentiable in its parameters under grad mode."""
    if task_loss is loss_fn:
        loss = loss_fn(outputs, targets)
        (gradient,) = torch.autograd.grad(loss, outputs, create_graph=create_graph)
        return loss, gradient, loss.detach(), None
    closed_form = getattr(loss_fn, "closed_form_gradients", None)
    if closed_form is not None:
        with torch.set_grad_enabled(create_graph):
            loss, gradient, value, task_gradient = closed_form(outputs, targets)
    else:
        loss = loss_fn(outputs, targets)
        (gradient,) = torch.autograd.grad(loss, outputs, create_graph=create_graph)
        if max_grad_ratio is None:
            with torch.no_grad():
                return loss, gradient, task_loss(outputs, targets), None
        value = task_loss(outputs, targets)
        (task_gradient,) = torch.autograd.grad(value, outputs)
        value = value.detach()
    if max_grad_ratio is None:
        return loss, gradient, value, None
    squares = differentiable_sum(torch.stack([task_gradient.pow(2).sum(), gradient.pow(2).sum()]))
    bound = max_grad_ratio * squares[0].sqrt() / squares[1].sqrt().clamp_min(1e-30)
    scale = bound if match_scale else bound.clamp(max=1.0)
    return loss, gradient * scale, value, scale.detach()


def meta_update(
    model: nn.Module, params: dict[str, torch.Tensor], old_params: dict[str, torch.Tensor], diagonal: Diagonal,
    meta: tuple[nn.Module, torch.optim.Optimizer, Batch], task_loss: LossFn, inputs: torch.Tensor,
    rng: dict[str, torch.Tensor], kept: KeptOutputs | None, output_grad: torch.Tensor, autocast: Callable[[], Any],
    amp: torch.dtype | None, meta_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of the loss network by the one-step meta-gradient (module docstring), after the model's step;
    returns the meta loss and the meta-gradient's norm (device tensors)."""
    loss_net, meta_optimizer, (meta_inputs, meta_targets) = meta
    with batch_statistics_only(model):
        with autocast():
            meta_outputs = model(meta_inputs)
        meta_loss = task_loss(to_float32(meta_outputs, amp), meta_targets)
        direction = torch.autograd.grad(meta_loss, list(params.values()), allow_unused=True, materialize_grads=True)
        all_reduce_mean_(direction)
        tangents = {name: diagonal[p] * v if p in diagonal else torch.zeros_like(v)
                    for (name, p), v in zip(params.items(), direction, strict=True)}
        output_tangent = model_jvp(model, old_params, tangents, inputs, rng, kept)

    meta_objective = -(output_tangent * output_grad).sum()
    meta_optimizer.zero_grad(set_to_none=True)
    meta_objective.backward()
    meta_params = [p for p in loss_net.parameters() if p.grad is not None]
    all_reduce_mean_([p.grad for p in meta_params])
    grad_norm = torch.nn.utils.clip_grad_norm_(meta_params, meta_clip if meta_clip is not None else math.inf)
    meta_optimizer.step()
    return meta_loss.detach(), grad_norm.detach()


def online_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    task_loss: LossFn,
    meta: tuple[nn.Module, torch.optim.Optimizer, Batch] | None = None,
    max_grad_ratio: float | None = None,
    meta_clip: float | None = None,
    amp: torch.dtype | None = None,
    match_scale: bool = False,
    keep_outputs: bool = True,
) -> StepStats:
    """Step `model` with `loss_fn` on `batch`; with `meta = (loss_net, meta_optimizer, meta_batch)`
    also update the loss network by the one-step meta-gradient of `task_loss` on `meta_batch`, its norm
    clipped to `meta_clip` when given. `max_grad_ratio` bounds the step's scale (sets it, with `match_scale`),
    `amp` autocasts the model's forward passes, `keep_outputs` lets the meta-gradient's forward-mode product take
    its layers' primal outputs from the real forward (module docstring)."""
    inputs, targets = batch
    device = inputs.device
    # without amp no autocast context at all: entering even a disabled one costs about 0.5 % of a LeNet-5 step
    autocast = functools.partial(torch.autocast, device.type, dtype=amp) if amp is not None else contextlib.nullcontext
    if not all(module.training for module in model.modules()):
        model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # frozen ones stay as they are
    old_params = {name: p.detach().clone() for name, p in params.items()} if meta else None
    rng_before = capture_rng(device) if meta else None
    update = elementwise_update(optimizer) if meta is not None else None  # ConfigError for an uncovered optimizer
    if match_scale and max_grad_ratio is None:
        raise ValueError("match_scale sets the step's scale to max_grad_ratio times the task loss's: "
                         "give max_grad_ratio")

    # an update step keeps the real forward's layer outputs for its forward-mode product: the same values, unless
    # autocast computed them in another precision than the product's float32 (or torch.compile hides its layers)
    keep = keep_outputs and meta is not None and amp is None and not hasattr(model, "_orig_mod")
    with autocast(), (kept_layer_outputs(model) if keep else contextlib.nullcontext(None)) as kept:
        outputs = model(inputs)
    outputs_leaf = to_float32(outputs.detach(), amp).requires_grad_()
    loss, output_grad, batch_task_loss, bound_scale = output_gradient(
        loss_fn, task_loss, outputs_leaf, targets, meta is not None, max_grad_ratio, match_scale)
    optimizer.zero_grad(set_to_none=True)
    outputs.backward(output_grad.detach().to(outputs.dtype))
    all_reduce_mean_([p.grad for p in params.values() if p.grad is not None])
    grads = {}
    if update is not None and update.uses_gradient:
        grads = {p: p.grad.detach().clone() for p in params.values() if p.grad is not None}
    optimizer.step()
    stats = StepStats(train_loss=loss.detach(), task_loss=batch_task_loss, finite=torch.isfinite(loss.detach()),
                      bound_scale=bound_scale)
    if meta is None:
        return stats

    if not update.uses_gradient:
        grads = {p: p for p in params.values() if p.grad is not None}  # e.g. SGD's D needs no gradient values
    diagonal = update_jacobian_diagonal(optimizer, grads, {p: old_params[n] for n, p in params.items()})
    stats.meta_loss, stats.meta_grad_norm = meta_update(model, params, old_params, diagonal, meta, task_loss, inputs,
                                                        rng_before, kept, output_grad, autocast, amp, meta_clip)
    stats.finite = stats.finite & torch.isfinite(stats.meta_grad_norm)
    return stats
