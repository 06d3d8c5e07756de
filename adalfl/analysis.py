"""Readouts of the learned loss: its shape l(y, p) over predictions (drawn by engine.figures); the
gradient-norm ratio to the task loss (the implicit learning-rate schedule), argmin_p l(1, p) (adaptive
label smoothing) and the model's mean confidence (softmax saturation)."""

from __future__ import annotations

import torch
from torch import nn

from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import Batch, LossFn, batch_statistics_only

TARGET_VALUES = (1.0, 0.0)


def prediction_grid(loss: OutputWiseLoss, points: int = 101) -> torch.Tensor:
    """Probabilities in [0, 1] for classification losses, values in [-2, 3] for regression."""
    if loss.prediction == "identity":
        return torch.linspace(-2.0, 3.0, points)
    return torch.linspace(0.0, 1.0, points)


def loss_shape(loss: OutputWiseLoss, points: int = 101) -> dict[str, list[float]]:
    """{'prediction': grid, 'y=1': l(1, p) over the grid, 'y=0': l(0, p) over the grid}."""
    device = next(loss.parameters()).device
    dtype = next(loss.parameters()).dtype
    grid = prediction_grid(loss, points).to(device=device, dtype=dtype)
    shape = {"prediction": grid.tolist()}
    with torch.no_grad():
        for y in TARGET_VALUES:
            shape[f"y={y:g}"] = loss.pointwise(torch.full_like(grid, y), grid).tolist()
    return shape


def argmin_prediction(shape: dict[str, list[float]], target: str = "y=1") -> float:
    """The prediction on the shape's grid where l(target, p) is smallest: below 1 for y = 1 means the loss
    asks for less than full confidence, i.e. it smooths the labels."""
    values = torch.tensor(shape[target])
    return shape["prediction"][int(values.argmin())]


def gradient_norm_ratio(
    model: nn.Module, loss: LossFn, reference: LossFn, batch: Batch, max_grad_ratio: float | None = None,
    match_scale: bool = False,
) -> float:
    """||grad_theta loss|| / ||grad_theta reference|| on `batch` at the model's current parameters, for the
    step as taken: with `max_grad_ratio`, the loss's gradient scaled by the bound online_step applies (or set to
    the ratio, with `match_scale`).

    One extra forward and a few backward passes; the model's .grad, batch-norm running statistics and the
    global random state (dropout) are left as they were, so a run with readouts trains exactly as one without.
    """
    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    devices = [torch.cuda.current_device()] if inputs.is_cuda else []
    with torch.random.fork_rng(devices=devices), batch_statistics_only(model):
        outputs = model(inputs)
    leaf = outputs.detach().requires_grad_()
    output_grads = [torch.autograd.grad(fn(leaf, targets), leaf)[0] for fn in (loss, reference)]
    scale = 1.0
    if max_grad_ratio is not None:
        scale = max_grad_ratio * output_grads[1].norm().item() / max(output_grads[0].norm().item(), 1e-30)
        scale = scale if match_scale else min(1.0, scale)
    norms = []
    for grad in output_grads:
        grads = torch.autograd.grad(outputs, params, grad, retain_graph=True)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)).item())
    return scale * norms[0] / norms[1] if norms[1] > 0 else float("nan")


def mean_confidence(model: nn.Module, inputs: torch.Tensor) -> float:
    """Mean over `inputs` of the largest softmax probability: near 1 everywhere means a saturated model,
    whose softmax passes almost no gradient. Batch statistics, running statistics and random state untouched."""
    devices = [torch.cuda.current_device()] if inputs.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), batch_statistics_only(model):
        return model(inputs).softmax(dim=-1).amax(dim=-1).mean().item()
