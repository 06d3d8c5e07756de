"""The single-task methods in one table: the loss each trains with, whether it learns that loss (offline in
phase 1, and online too), which search finds it, which tasks it fits, and its colour in every figure.

ce / mse / label_smoothing / sparse_lsr: handcrafted loss; taylorglo: a Taylor-polynomial loss searched by CMA-ES,
then frozen; evomal: a symbolic loss searched by genetic programming with a gradient local search, then frozen;
ml3: loss learned offline (phase 1) then frozen; adalfl: phase 1 + online.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BOTH = ("classification", "regression")


@dataclass(frozen=True)
class MethodSpec:
    loss: Literal["task", "label_smoothing", "sparse_lsr", "searched", "learned"]
    tasks: tuple[str, ...]  # the task kinds it fits
    colour: str  # matplotlib colour: the same method has the same colour in every figure
    search: Literal["taylorglo", "evomal"] | None = None  # the search that finds a "searched" loss
    online: bool = False  # a "learned" loss keeps learning through phase 2 (else frozen after phase 1)
    instead: str = ""  # the method to name when a task kind does not fit

    @property
    def learns_loss(self) -> bool:
        return self.loss == "learned"


METHOD_SPECS: dict[str, MethodSpec] = {
    "ce": MethodSpec("task", ("classification",), "tab:blue", instead="mse"),
    "mse": MethodSpec("task", ("regression",), "tab:blue", instead="ce"),
    "label_smoothing": MethodSpec("label_smoothing", ("classification",), "tab:purple", instead="mse"),
    "sparse_lsr": MethodSpec("sparse_lsr", ("classification",), "tab:pink", instead="mse"),
    "taylorglo": MethodSpec("searched", BOTH, "tab:red", search="taylorglo"),
    "evomal": MethodSpec("searched", BOTH, "tab:brown", search="evomal"),
    "ml3": MethodSpec("learned", BOTH, "tab:orange"),
    "adalfl": MethodSpec("learned", BOTH, "tab:green", online=True),
}
METHOD_COLOURS = {name: spec.colour for name, spec in METHOD_SPECS.items()}
