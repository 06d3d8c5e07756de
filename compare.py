"""Run a comparison grid (methods x seeds) from one base config and summarise it.

    python compare.py --config configs/adalfl_mnist.yaml --methods ce label_smoothing ml3 adalfl \\
        --seeds 0 1 2 3 4 --out runs/grid_mnist --set train.steps=2000 --set meta.init_steps=500
    python compare.py --out runs/grid_mnist --summary-only      # tables and figures of finished cells

Each cell is the run folder <out>/<method>-seed<k>, made with `--set method=<method> --set seed=<k>` on top
of the base config and the --set overrides. A cell with results.json is skipped, one with a checkpoint but
no results is resumed, any other is started. A method may also be given as LABEL=CONFIG.yaml to run another
config (e.g. an NPBML ablation) under that label. Then <out> gets summary.csv and summary.md (mean and std
of the final test metric per method over seeds, with their number, and the mean 95% CI where the runs report
one) and PNG figures: learning_curves.png, readouts.png, loss_evolution_<method>.png, accuracy.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import train
from adalfl import figures
from engine.run_dir import RunDir

FINAL_METRICS = ("test_error", "test_mse", "test_accuracy")  # the first one a results.json holds is reported
METHOD_ORDER = ("ce", "mse", "label_smoothing", "taylorglo", "ml3", "adalfl")


@dataclass(frozen=True)
class Cell:
    """One (method, seed) run of the grid; `config` is the method's own config when given as LABEL=CONFIG."""

    label: str
    seed: int
    config: Path
    own_config: bool

    def run_dir(self, out: Path) -> RunDir:
        return RunDir(out / f"{self.label}-seed{self.seed}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="base YAML config every cell starts from")
    parser.add_argument("--methods", nargs="+", default=[], help="methods (or LABEL=CONFIG.yaml) to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each method")
    parser.add_argument("--out", type=Path, required=True, help="grid folder: one run folder per cell, summaries")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config value in every cell (repeatable)")
    parser.add_argument("--data-root", help="folder holding the data sets (as for train.py)")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; summarise the cells in --out")
    args = parser.parse_args(argv)
    if not args.summary_only and (args.config is None or not args.methods):
        parser.error("give --config and --methods to run a grid, or --summary-only to summarise one")
    return args


def grid_cells(config: Path, methods: list[str], seeds: list[int]) -> list[Cell]:
    cells = []
    for method in methods:
        label, _, own = method.partition("=")
        cells += [Cell(label, seed, Path(own) if own else config, bool(own)) for seed in seeds]
    return cells


def run_cell(cell: Cell, out: Path, overrides: list[str], data_root: str | None) -> int:
    """Skip a finished cell, resume a started one, start a new one; returns train.py's exit code."""
    run = cell.run_dir(out)
    data = ["--data-root", data_root] if data_root else []
    if run.results.is_file():
        print(f"[grid] {run.path.name}: finished, skipped")
        return 0
    if run.checkpoint.is_file():
        print(f"[grid] {run.path.name}: resuming")
        return train.main(["--resume", str(run.path), *data])
    print(f"[grid] {run.path.name}: starting")
    sets = [f"name={run.path.name}", f"seed={cell.seed}", *([] if cell.own_config else [f"method={cell.label}"])]
    sets += overrides
    return train.main(["--config", str(cell.config), "--runs-root", str(out), *data,
                       *(arg for s in sets for arg in ("--set", s))])


def load_results(out: Path) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """Finished cells under `out` grouped by method label, in METHOD_ORDER then alphabetical order."""
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for results in sorted(out.glob("*-seed*/results.json")):
        label = results.parent.name.rsplit("-seed", 1)[0]
        groups.setdefault(label, []).append((results.parent, json.loads(results.read_text())))
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def final_metric(results: dict[str, Any]) -> str:
    for key in FINAL_METRICS:
        if key in results:
            return key
    raise KeyError(f"results hold none of {', '.join(FINAL_METRICS)}")


def summary_rows(groups: dict[str, list[tuple[Path, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per method: the final metric's mean, sample std and number of seeds, and the mean reported 95% CI."""
    rows = []
    for label, cells in groups.items():
        metric = final_metric(cells[0][1])
        values = [r[metric] for _, r in cells]
        cis = [r["test_ci95"] for _, r in cells if "test_ci95" in r]
        rows.append({
            "method": label, "metric": metric, "n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "ci95": statistics.fmean(cis) if cis else None, "seeds": " ".join(str(r.get("seed", "")) for _, r in cells),
        })
    return rows


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv and summary.md; the latter also names the cells that have no results (diverged, stopped
    or still running), which the means leave out."""
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | metric | seeds (n) | mean | std | mean 95% CI |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"+- {r['ci95']:.4f}" if r["ci95"] is not None else ""
        lines.append(f"| {r['method']} | {r['metric']} | {r['n']} | {r['mean']:.4f} | {r['std']:.4f} | {ci} |")
    unfinished = sorted(p.name for p in out.glob("*-seed*") if p.is_dir() and not (p / "results.json").exists())
    if unfinished:
        lines.append(f"\nCells without results (diverged, stopped or running): {', '.join(unfinished)}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_figures(out: Path, groups: dict[str, list[tuple[Path, dict[str, Any]]]],
                  rows: list[dict[str, Any]]) -> list[Path]:
    written = []
    histories = {label: [r["history"] for _, r in cells] for label, cells in groups.items()
                 if all(r.get("history") for _, r in cells)}
    if histories:
        metric = final_metric(next(iter(groups.values()))[0][1]).removeprefix("test_")
        written.append(figures.learning_curves(histories, metric, out / "learning_curves.png"))
    readouts = {label: [r["readouts"] for _, r in cells] for label, cells in groups.items()
                if all(r.get("readouts") for _, r in cells)}
    if readouts:
        written.append(figures.readout_curves(readouts, out / "readouts.png"))
    for label, cells in groups.items():
        shapes = cells[0][0] / "loss_shapes.json"
        if shapes.is_file():
            title = f"{label}, {cells[0][0].name}"
            path = out / f"loss_evolution_{label}.png"
            written.append(figures.loss_evolution(json.loads(shapes.read_text()), title, path))
    accuracy = [r for r in rows if r["metric"] == "test_accuracy"]
    if accuracy:
        written.append(figures.accuracy_bars(accuracy, out / "accuracy.png"))
    return written


def summarise(out: Path) -> list[dict[str, Any]]:
    """summary.csv, summary.md and the figures of every finished cell in `out`; returns the summary rows."""
    groups = load_results(out)
    if not groups:
        raise FileNotFoundError(f"no finished cells (<method>-seed<k>/results.json) in {out}")
    rows = summary_rows(groups)
    write_summary(out, rows)
    for path in write_figures(out, groups, rows):
        print(f"[grid] wrote {path}")
    print((out / "summary.md").read_text())
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    if not args.summary_only:
        args.out.mkdir(parents=True, exist_ok=True)
        for cell in grid_cells(args.config, args.methods, args.seeds):
            code = run_cell(cell, args.out, args.overrides, args.data_root)
            if code == 130:
                print("[grid] interrupted; run the same command again to continue the grid", file=sys.stderr)
                return 130
            if code != 0:
                failed.append(cell.run_dir(args.out).path.name)
    try:
        summarise(args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"[grid] cells that failed (see their messages above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
