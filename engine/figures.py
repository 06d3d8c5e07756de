"""Every figure the project draws: a comparison grid's learning curves (the AdaLFL paper's Figure 3), the
learned loss's evolution coloured by step (Figures 1 and 4), the analysis readouts and accuracy bars with
confidence intervals (compare.py), and the learned-loss shapes runs log to TensorBoard. Figures are built on
`matplotlib.figure.Figure` directly, never through pyplot, so drawing one leaves the process's matplotlib backend
as it was. A grid's figures are saved twice: a PNG to look at and a PDF (vector) for a paper, at a paper's text
width (7 in)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation

DPI = 200
WIDTH = 7.0  # inches: a paper's text width (two columns)
PANEL_HEIGHT = 2.6
Series = Sequence[Mapping[str, float]]  # one run's records, each with a "step"


class NothingToDraw(ValueError):
    """A figure that would be empty; the message says why and what to change."""


class PlainLogFormatter(LogFormatterSciNotation):
    """Log-axis tick labels as plain numbers (0.6, not 6x10^-1), on the ticks matplotlib would label."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def log_scale(axis: Any) -> None:
    """A log y-axis with plain tick labels."""
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(PlainLogFormatter())
    axis.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def mean_band(runs: Sequence[Series], key: str, log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, centre, lower, upper): mean +- std of `key` over runs, on the steps every run recorded;
    with `log`, the geometric mean times/divided by the geometric std (a band that stays positive)."""
    steps = sorted(set.intersection(*({r["step"] for r in run if key in r} for run in runs)))
    values = np.array([[next(r[key] for r in run if r["step"] == s) for s in steps] for run in runs], dtype=float)
    if log:
        mean, std = np.log(values).mean(axis=0), np.log(values).std(axis=0)
        return np.array(steps), np.exp(mean), np.exp(mean - std), np.exp(mean + std)
    mean, std = values.mean(axis=0), values.std(axis=0)
    return np.array(steps), mean, mean - std, mean + std


def _save(figure: Figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> list[Path]:
    """`path` (a PNG) and the same figure as a PDF beside it; `rect`, the part of the figure the panels fill."""
    figure.tight_layout(rect=rect)
    figure.savefig(path, dpi=DPI)
    figure.savefig(path.with_suffix(".pdf"))
    return [path, path.with_suffix(".pdf")]


def curve_labels(runs_by_label: Mapping[str, Sequence[Series]], key: str) -> list[str]:
    """The labels whose runs recorded `key` at two or more common steps (a curve to draw)."""
    return [label for label, runs in runs_by_label.items() if len(mean_band(runs, key)[0]) >= 2]


def label_colours(labels: Sequence[str], own: Mapping[str, str]) -> dict[str, str]:
    """A label's `own` colour where it has one (a method's, the same in every figure); every other label a distinct
    colour none of those use (for up to 53 such labels; beyond that the extra palette repeats)."""
    reserved = set(own.values())
    spare = iter(c for c in (f"tab:{n}" for n in ("gray", "olive", "cyan", "brown", "red", "purple", "orange",
                                                    "pink", "blue", "green")) if c not in reserved)
    # the light shades of tab20, distinct from the methods', then tab20b and tab20c
    spare_more = itertools.cycle([*matplotlib.colormaps["tab20"].colors[1::2], *matplotlib.colormaps["tab20b"].colors,
                                  *matplotlib.colormaps["tab20c"].colors])
    return {label: own.get(label) or next(spare, None) or next(spare_more) for label in labels}


def _bands(axis: Any, runs_by_label: Mapping[str, Sequence[Series]], key: str, log: bool = False,
           colours: Mapping[str, str] | None = None) -> None:
    colours = colours or label_colours(list(runs_by_label), {})
    for label, runs in runs_by_label.items():
        steps, centre, lower, upper = mean_band(runs, key, log)
        if len(steps) == 0:
            continue
        line = axis.plot(steps, centre, label=f"{label} (n={len(runs)})", color=colours[label])[0]
        axis.fill_between(steps, lower, upper, color=line.get_color(), alpha=0.2)


def learning_curves(histories: Mapping[str, Sequence[Series]], metric: str, path: Path,
                    colours: Mapping[str, str] | None = None) -> list[Path]:
    """Validation and test `metric` against gradient steps, mean over seeds with a ±1 std band; `colours`
    (label -> colour, by default label_colours') keeps a label's colour the same across a grid's figures.
    NothingToDraw when no label's runs evaluated twice."""
    if not curve_labels(histories, f"val_{metric}"):
        raise NothingToDraw("every run evaluated once (at its end), so there is no curve; set train.eval_every "
                            "below train.steps to draw one")
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, split in zip(axes, ("val", "test"), strict=True):
        _bands(axis, histories, f"{split}_{metric}", colours=colours)
        axis.set_xlabel("gradient steps")
        axis.set_ylabel(f"{split} {metric}")
        axis.set_title(f"{split} {metric} (mean ± std over seeds)", fontsize="medium")
        log_scale(axis)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    return _save(figure, path)


def readout_curves(readouts: Mapping[str, Sequence[Series]], path: Path, steps: str = "gradient steps",
                   colours: Mapping[str, str] | None = None, task_loss: str = "cross-entropy") -> list[Path]:
    """The gradient-norm ratio to the task loss (implicit learning-rate schedule; geometric mean and std),
    argmin_p l(1, p) (adaptive label smoothing) and, for classification, the model's mean confidence
    (softmax saturation) against `steps`, mean over seeds with a band, with the `task_loss`'s own values (ratio 1,
    minimum at p = 1) as dotted reference lines; `colours` as learning_curves'. NothingToDraw when no label's runs
    recorded two readouts."""
    if not curve_labels(readouts, "grad_norm_ratio"):
        raise NothingToDraw("every run recorded its readouts once, so there is no curve; set log.scalars_every "
                            "below the run's steps to draw one")
    panels = [("grad_norm_ratio", "‖∇ learned loss‖ / ‖∇ task loss‖", "implicit learning-rate schedule", 1.0),
              ("argmin_p_y1", "argmin_p l(y=1, p)", "where l(1, p) is minimal", 1.0)]
    if all("confidence" in r for runs in readouts.values() for run in runs for r in run):
        panels.append(("confidence", "mean max softmax probability", "confidence (saturation)", None))
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (key, ylabel, title, reference) in zip(axes, panels, strict=True):
        _bands(axis, readouts, key, log=key == "grad_norm_ratio", colours=colours)
        if key == "grad_norm_ratio":
            log_scale(axis)
        if reference is not None:
            axis.axhline(reference, color="black", linestyle=":", linewidth=1, label=task_loss)
        axis.set_ylabel(ylabel, fontsize="small")
        axis.set_xlabel(steps)
        axis.set_title(title, fontsize="medium")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize="small")
    return _save(figure, path, rect=(0, 0.12, 1, 1))


def loss_evolution(shapes_by_seed: Mapping[int, Sequence[Mapping[str, Any]]], label: str, path: Path) -> list[Path]:
    """For each seed (a row): l(y=1, p) and l(y=0, p) at each logged step of phase 2, coloured by step, and the
    end of phase 1 dashed. A loss that never changed in phase 2 (frozen, e.g. ML3) has no colour bar: its one curve
    is labelled instead."""
    steps = sorted({s["step"] for shapes in shapes_by_seed.values() for s in shapes if s["phase"] == "online"})
    evolves = len(steps) > 1
    colours = matplotlib.colormaps["viridis"]
    norm = Normalize(0, steps[-1] if evolves else 1)
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT * len(shapes_by_seed)))
    rows = figure.subplots(len(shapes_by_seed), 2, squeeze=False)
    for axes, (seed, shapes) in zip(rows, shapes_by_seed.items(), strict=True):
        for axis, target in zip(axes, ("y=1", "y=0"), strict=True):
            for shape in shapes:
                if shape["phase"] == "init":
                    axis.plot(shape["prediction"], shape[target], "k--", linewidth=1, label="end of phase 1")
                elif evolves:
                    axis.plot(shape["prediction"], shape[target], color=colours(norm(shape["step"])), linewidth=1)
                else:
                    axis.plot(shape["prediction"], shape[target], color="tab:blue", linewidth=1,
                              label=f"phase 2 (step {shape['step']}, frozen)")
            axis.set_xlabel("prediction p")
            axis.set_ylabel(f"l({target[2:]}, p)")
            axis.set_title(f"{label}, seed {seed}: l({target[2:]}, p)", fontsize="medium")
            axis.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize="small")
        if evolves:
            figure.colorbar(ScalarMappable(cmap=colours, norm=norm), ax=axes[1], label="gradient step")
    return _save(figure, path)


def loss_terms(runs: Sequence[Series], label: str, path: Path) -> list[Path]:
    """NPBML's learned-loss terms against meta-iterations, each relative to cross-entropy at the initialisation:
    the term's value and its gradient's norm in the adapted parameters (geometric mean over seeds with a band,
    log axes; 1 is CE's own size). NothingToDraw when the runs logged the terms fewer than twice."""
    terms = sorted({key.removesuffix("_grad_over_ce") for run in runs for r in run for key in r
                    if key.endswith("_grad_over_ce")})
    if not terms or min(len(run) for run in runs) < 2:
        raise NothingToDraw("the runs logged the learned loss's terms fewer than twice (learned_loss/*_over_ce "
                            "every log.every meta-iterations); run longer or lower log.every")
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT + 0.4))
    axes = figure.subplots(1, 2, sharey=True)
    colours = label_colours(terms, {})
    for axis, (suffix, title) in zip(axes, (("over_ce", "term / CE"), ("grad_over_ce", "‖∇ term‖ / ‖∇ CE‖")),
                                     strict=True):
        positive = {term: [[{"step": r["step"], "v": max(r[f"{term}_{suffix}"], 1e-12)} for r in run
                            if f"{term}_{suffix}" in r] for run in runs] for term in terms}
        _bands(axis, positive, "v", log=True, colours=colours)
        axis.axhline(1.0, color="black", linestyle=":", linewidth=1, label="cross-entropy")
        log_scale(axis)
        axis.set_xlabel("meta-iterations")
        axis.set_title(title, fontsize="medium")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{label}: the learned loss's terms at the initialisation, relative to cross-entropy",
                    fontsize="medium")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small")
    return _save(figure, path, rect=(0, 0.12, 1, 1))


def accuracy_bars(rows: Sequence[Mapping[str, Any]], path: Path) -> list[Path]:
    """Mean test accuracy per method or ablation with its 95% confidence interval as error bars."""
    figure = Figure(figsize=(min(WIDTH, max(3.5, 0.8 * len(rows) + 1.5)), PANEL_HEIGHT))
    axis = figure.subplots()
    labels = [r["method"] for r in rows]
    errors = [r["ci95"] if r["ci95"] is not None else 0.0 for r in rows]
    axis.bar(labels, [r["mean"] for r in rows], yerr=errors, capsize=5, color="tab:blue", alpha=0.8)
    axis.set_ylabel("test accuracy (95% CI)")
    axis.set_title("test accuracy per method")
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def loss_shape_figure(shape: Mapping[str, Sequence[float]], title: str) -> Figure:
    """A learned loss's curves l(y, p) over the predictions p (the papers' Figure 1 view): `shape` holds
    "prediction" and one "y=<target>" curve per target."""
    figure = Figure(figsize=(4.5, 3.2), dpi=100)
    axis = figure.subplots()
    for key in (k for k in shape if k.startswith("y=")):
        axis.plot(shape["prediction"], shape[key], label=f"y = {key[2:]}")
    axis.set_xlabel("prediction p")
    axis.set_ylabel("learned loss l(y, p)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return figure


def support_shape_figure(margins: Sequence[float], learned: Sequence[float], ce: Sequence[float]) -> Figure:
    """NPBML's learned support loss (CE + L_S) and CE alone against the true-class logit, the others at 0."""
    figure = Figure(figsize=(4, 3))
    axis = figure.subplots()
    axis.plot(margins, learned, label="CE + L_S (learned)")
    axis.plot(margins, ce, "--", label="CE")
    axis.set_xlabel("true-class logit (others 0)")
    axis.legend()
    figure.tight_layout()
    return figure
