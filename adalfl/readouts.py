"""What a single-task run records of the loss it trains with, for results.json and TensorBoard: the readouts of
adalfl/analysis.py (the gradient-norm ratio to the task loss, argmin_p l(1, p) and, for classification, the model's
mean confidence) in phase 2 and at phase 1's probe, and the loss's shape l(y, p) as it evolves."""

from __future__ import annotations

from typing import Any

from torch import nn

from adalfl.adaptive_loss import AdaptiveLoss
from adalfl.analysis import argmin_prediction, gradient_norm_ratio, loss_shape, mean_confidence
from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import Batch, LossFn
from engine.distributed import EventWriter
from engine.figures import loss_shape_figure
from engine.tags import PHASE_1


class LossReadouts:
    """The records (`readouts`: phase 2's; `init_readouts`: phase 1's; `loss_shapes`), checkpointed with the run."""

    def __init__(self, task_loss: LossFn, classification: bool, adaptive: AdaptiveLoss | None) -> None:
        self.task_loss, self.classification, self.adaptive = task_loss, classification, adaptive
        self.readouts: list[dict[str, float]] = []
        self.init_readouts: list[dict[str, float]] = []  # phase 1's, at log.scalars_every
        self.loss_shapes: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"readouts": self.readouts, "init_readouts": self.init_readouts, "loss_shapes": self.loss_shapes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.readouts, self.init_readouts = state["readouts"], state["init_readouts"]
        self.loss_shapes = state["loss_shapes"]

    def _measure(self, model: nn.Module, loss: OutputWiseLoss, batch: Batch, step: int,
                 confident: nn.Module) -> dict[str, float]:
        """The implicit learning-rate schedule and adaptive label smoothing of `loss` at `model`, and
        (classification) the mean confidence of `confident` on `batch`."""
        adaptive = self.adaptive
        record = {
            "step": step,
            "grad_norm_ratio": gradient_norm_ratio(model, loss, self.task_loss, batch,
                                                   adaptive.max_grad_ratio if adaptive else None,
                                                   adaptive.match_scale if adaptive else False),
            "argmin_p_y1": argmin_prediction(loss_shape(loss)),
        }
        if self.classification:
            record["confidence"] = mean_confidence(confident, batch[0])
        return record

    def online(self, writer: EventWriter, model: nn.Module, loss: OutputWiseLoss, batch: Batch, step: int) -> None:
        """Phase 2: the readouts of the trained model on its latest training batch."""
        self._write(writer, "analysis", self._measure(model, loss, batch, step, model), self.readouts)

    def offline(self, writer: EventWriter, start: nn.Module, probe: nn.Module, loss: OutputWiseLoss, batch: Batch,
                step: int) -> None:
        """Phase 1: the gradient-norm ratio the first online step would see (at the phase-2 initialisation
        `start`) and the confidence of the `probe` model after its step with the learned loss."""
        self._write(writer, PHASE_1, self._measure(start, loss, batch, step, probe), self.init_readouts)

    @staticmethod
    def _write(writer: EventWriter, group: str, record: dict[str, float], records: list[dict[str, float]]) -> None:
        records.append(record)
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"{group}/{key}", value, record["step"])

    def shape(self, writer: EventWriter, loss: OutputWiseLoss, phase: str, step: int) -> None:
        """Record and draw the loss's shape l(y, p) at `step` of `phase` ("init" or "online")."""
        shape = loss_shape(loss)
        self.loss_shapes.append({"phase": phase, "step": step, **shape})
        tag = f"{PHASE_1}/loss_shape" if phase == "init" else "learned_loss/shape"
        writer.add_figure(tag, loss_shape_figure(shape, f"{phase} step {step}"), step)
