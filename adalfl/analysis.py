"""Readouts of the learned loss: its shape l(y, p) over predictions, as numbers and as a figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from adalfl.loss_network import OutputWiseLoss  # noqa: E402

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


def loss_shape_figure(shape: dict[str, list[float]], title: str) -> Figure:
    """The curves of `loss_shape` in one plot (the papers' Figure 1 view)."""
    figure, axis = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    for y in TARGET_VALUES:
        axis.plot(shape["prediction"], shape[f"y={y:g}"], label=f"y = {y:g}")
    axis.set_xlabel("prediction p")
    axis.set_ylabel("learned loss l(y, p)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return figure
