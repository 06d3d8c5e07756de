"""Run a comparison grid (methods x seeds) from one base config and summarise it.

    python compare.py --config configs/adalfl_mnist.yaml --methods ce label_smoothing ml3 adalfl \\
        --seeds 0 1 2 3 4 --out runs/grid_mnist --set train.steps=2000 --set meta.init_steps=500
    python compare.py --config configs/adalfl_mnist.yaml --methods ce adalfl --seeds 0 1 2 \\
        --sweep optimizer.lr=0.01,0.03,0.1,0.3 --out runs/grid_mnist_tuned --jobs 2
    python compare.py --out runs/grid_mnist --summary-only      # tables and figures of finished cells
    python compare.py --out runs/grid_mnist --summary-only --labels ce adalfl   # of some labels, in <out>/selection/

Each cell is the run folder <out>/<label>-seed<k>, made with `--set method=<method> --set seed=<k>` on top
of the base config and the --set overrides. A cell with results.json is skipped, one with a checkpoint but
no results is resumed, any other is started. A method may also be given as LABEL=CONFIG.yaml to run another
config (e.g. an NPBML ablation) under that label, or as LABEL=METHOD,KEY=VALUE,... to run a method with
overrides of its own (an ablation variant; "{seed}" in a value becomes the cell's seed). With
--sweep KEY=V1,V2,..., the first method (the baseline) runs at every value (cells <baseline>@KEY=V-seed<k>),
the value with the lowest mean final validation metric over the seeds is chosen (sweep.json), and the other
methods run at that value unless their label sets KEY itself (--sweep-seeds tunes on some seeds only and runs
the baseline's others at the chosen value). Then <out> gets summary.csv and summary.md
(per label the final and validation-selected test metric: mean with its 95% t-interval over the seeds, std,
per-seed values, the paired difference to the baseline with its 95% t-interval, the training compute and phase 1's
steps; the mean reported 95% CI where the runs report one) and figures, each a PNG and a PDF:
learning_curves, readouts, init_readouts (phase 1), loss_evolution_<label> (every seed, or
--loss-evolution-seed's), loss_terms_<label> (NPBML: its learned terms, read from the cells' events), accuracy.
--jobs N runs N cells at once as separate processes (each with cores / N threads, its output in <out>/logs/).
--launcher slurm runs each cell as a SLURM job instead (submitit; engine/slurm_launcher.py): the sweep's cells
first, the others after its choice, a preempted or timed-out cell requeued and resumed; a cell whose config sets
processes: N runs under torchrun with N processes.

    python compare.py --config configs/adalfl_mnist.yaml --methods ce adalfl --seeds 0 1 2 --out runs/grid_mnist \\
        --launcher slurm --slurm-partition gpu --slurm-time 240 --gpus-per-cell 1 --cpus-per-cell 8 --dry-run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

import train
from adalfl.methods import METHOD_COLOURS, METHOD_SPECS
from engine import figures
from engine.config import apply_override, load_yaml
from engine.errors import ConfigError
from engine.events import scalar_series
from engine.experiment import resolve_config
from engine.run_dir import RunDir, write_text_atomic
from engine.run_loop import Stop
from engine.selection import MIN_EVALUATIONS_TO_SELECT as MIN_EVALUATIONS
from engine.slurm_launcher import RunCommand, SlurmLauncher, SlurmOptions, describe

FINAL_METRICS = ("test_error", "test_mse", "test_accuracy")  # the first one a results.json holds is reported
METHOD_ORDER = tuple(METHOD_SPECS)
SWEEP_FILE = "sweep.json"
LOSS_TERMS = "learned_loss/"  # the episodic trainer's tags of the learned loss's terms (npbml/meta_trainer.py)
SLURM_FOLDER = "slurm"  # in <out>: the SLURM jobs' logs and submitit's files
SLURM_FLAGS = {"slurm_partition": "--slurm-partition", "slurm_time": "--slurm-time", "gpus_per_cell": "--gpus-per-cell",
               "cpus_per_cell": "--cpus-per-cell", "slurm_options": "--slurm-option", "dry_run": "--dry-run"}
GRID_FILE = "grid.json"  # the grid's baseline label and the compute ratios its METHOD@compute=LABEL cells ran at
COMPUTE_SPEC = re.compile(r"^(?P<method>\w+)@compute=(?P<reference>[^,=]+)(?P<rest>,.*)?$")


@dataclass(frozen=True)
class Cell:
    """One (label, seed) run of the grid: `config` is the method's own config when given as LABEL=CONFIG;
    `sets` are the label's own overrides (method=..., variant and sweep settings)."""

    label: str
    seed: int
    config: Path
    own_config: bool
    sets: tuple[str, ...] = ()
    compute_of: str | None = None  # run at this label's measured training compute (METHOD@compute=LABEL)

    def run_dir(self, out: Path) -> RunDir:
        return RunDir(out / f"{self.label}-seed{self.seed}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="base YAML config every cell starts from")
    parser.add_argument("--methods", nargs="+", default=[],
                        help="methods, LABEL=CONFIG.yaml or LABEL=METHOD,KEY=VALUE,... to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each method")
    parser.add_argument("--out", type=Path, required=True, help="grid folder: one run folder per cell, summaries")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config value in every cell (repeatable)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help="tune KEY for the first method on validation, then run the others at the chosen value")
    parser.add_argument("--sweep-seeds", nargs="+", type=int, metavar="SEED",
                        help="tune --sweep on these seeds only (default: all); the baseline's other seeds then run "
                        "at the chosen value, so the seeds that decide no setting can be held out")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    parser.add_argument("--data-root", help="folder holding the data sets (as for train.py)")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; summarise the cells in --out")
    parser.add_argument("--labels", nargs="+", help="with --summary-only: summarise only these labels, in this "
                        "order, into <out>/selection/ (the grid's own summary is left as it is)")
    parser.add_argument("--loss-evolution-seed", type=int, metavar="SEED",
                        help="draw the learned loss's evolution of this seed only (default: every seed, a row each)")
    slurm = parser.add_argument_group("on a SLURM cluster (--launcher slurm)")
    slurm.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: cells run on this machine (--jobs); slurm: each cell is one SLURM job (submitit)")
    slurm.add_argument("--slurm-partition", help="the partition the cells' jobs go to (default: the cluster's)")
    slurm.add_argument("--slurm-time", type=int, metavar="MINUTES",
                       help="each job's time limit (default 60); a cell that needs longer is requeued and resumed")
    slurm.add_argument("--gpus-per-cell", type=int, metavar="N", help="GPUs of each job (default 0)")
    slurm.add_argument("--cpus-per-cell", type=int, metavar="N", help="CPU cores of each job (default 1)")
    slurm.add_argument("--slurm-option", dest="slurm_options", action="append", metavar="NAME[=VALUE]",
                       help="another sbatch option for every job, e.g. account=lab, qos=high, constraint=a100 "
                       "(repeatable)")
    slurm.add_argument("--dry-run", action="store_true", help="print the jobs the grid would submit; submit nothing")
    args = parser.parse_args(argv)
    check_launcher_args(parser, args)
    if not args.summary_only and (args.config is None or not args.methods):
        parser.error("give --config and --methods to run a grid, or --summary-only to summarise one")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be at least 1")
    if args.labels and not args.summary_only:
        parser.error("--labels selects what --summary-only summarises; add --summary-only")
    if args.sweep is not None:
        key, _, values = args.sweep.partition("=")
        if not key or not values:
            parser.error(f"--sweep {args.sweep!r} must look like KEY=V1,V2,... (e.g. optimizer.lr=0.01,0.03,0.1)")
        args.sweep = (key, values.split(","))
    if args.sweep_seeds is not None and (args.sweep is None or not set(args.sweep_seeds) <= set(args.seeds)):
        parser.error("--sweep-seeds needs --sweep, and its seeds must be among --seeds")
    return args


def check_launcher_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The SLURM options go with --launcher slurm only, and make `args.slurm` (SlurmOptions) of them."""
    given = [flag for name, flag in SLURM_FLAGS.items() if getattr(args, name) not in (None, False)]
    if args.launcher == "local":
        if given:
            parser.error(f"{', '.join(given)} applies to SLURM jobs; add --launcher slurm (or leave it out)")
        return
    if args.summary_only:
        parser.error("--summary-only runs no cell, so it takes no --launcher; leave --launcher slurm out")
    if args.jobs != 1:
        parser.error("--jobs sets the local processes; with --launcher slurm every cell is its own job and SLURM "
                     "runs as many at once as the cluster allows: leave --jobs out")
    for flag, value, least in (("--slurm-time", args.slurm_time, 1), ("--gpus-per-cell", args.gpus_per_cell, 0),
                               ("--cpus-per-cell", args.cpus_per_cell, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} {value} must be at least {least}")
    extra = []
    for option in args.slurm_options or []:
        name, _, value = option.removeprefix("--").partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            parser.error(f"--slurm-option {option!r} must look like NAME=VALUE or NAME (an sbatch option without "
                         "its dashes, e.g. account=lab)")
        extra.append((name, value))
    if not args.dry_run and shutil.which("sbatch") is None:
        parser.error("--launcher slurm needs SLURM's sbatch on PATH (run on the cluster's login node; for a "
                     "single-node test cluster on this machine: scripts/local_slurm.sh start)")
    args.slurm = SlurmOptions(args.slurm_partition, args.slurm_time or 60, args.gpus_per_cell or 0,
                              args.cpus_per_cell or 1, tuple(extra))


def top_level_split(text: str) -> list[str]:
    """`text` split at the commas outside brackets, so that a value may be a YAML list: "a=[1,2],b=3"."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def method_cells(spec: str, config: Path, seeds: list[int]) -> list[Cell]:
    """The cells of one --methods entry: METHOD, LABEL=CONFIG.yaml, LABEL=METHOD,KEY=VALUE,... or
    METHOD@compute=LABEL[,KEY=VALUE,...] (METHOD at LABEL's training compute)."""
    compute = COMPUTE_SPEC.match(spec)
    if compute:
        method, reference, rest = compute["method"], compute["reference"], compute["rest"]
        sets = top_level_split(rest[1:]) if rest else []
        return [Cell(f"{method}@compute={reference}", seed, config, False,
                     (f"method={method}", *(s.replace("{seed}", str(seed)) for s in sets)), reference)
                for seed in seeds]
    label, _, own = spec.partition("=")
    if own.endswith((".yaml", ".yml")):
        return [Cell(label, seed, Path(own), True) for seed in seeds]
    method, *sets = top_level_split(own) if own else [label]
    return [Cell(label, seed, config, False, (f"method={method}", *(s.replace("{seed}", str(seed)) for s in sets)))
            for seed in seeds]


def grid_cells(config: Path, methods: list[str], seeds: list[int]) -> list[Cell]:
    return [cell for spec in methods for cell in method_cells(spec, config, seeds)]


def sweep_cells(baseline: list[Cell], key: str, values: list[str]) -> dict[str, list[Cell]]:
    """The baseline's cells at each swept value, labelled <baseline>@KEY=VALUE."""
    return {v: [replace(c, label=f"{c.label}@{key}={v}", sets=(*c.sets, f"{key}={v}")) for c in baseline]
            for v in values}


def start_arguments(cell: Cell, out: Path, overrides: list[str], data_root: str | None) -> list[str]:
    """train.py's arguments that start `cell`."""
    data = ["--data-root", data_root] if data_root else []
    sets = [f"name={cell.run_dir(out).path.name}", f"seed={cell.seed}", *overrides, *cell.sets]  # the cell's win
    return ["--config", str(cell.config), "--runs-root", str(out), *data,
            *(arg for s in sets for arg in ("--set", s))]


def resume_arguments(cell: Cell, out: Path, data_root: str | None) -> list[str]:
    """train.py's arguments that resume `cell`: a lock left by a killed cell is taken over; a running one's is
    not."""
    data = ["--data-root", data_root] if data_root else []
    return ["--resume", str(cell.run_dir(out).path), "--take-over", *data]


def cell_arguments(cell: Cell, out: Path, overrides: list[str], data_root: str | None) -> list[str]:
    """train.py's arguments for `cell`: resume a started cell, else start it."""
    if cell.run_dir(out).checkpoint.is_file():
        return resume_arguments(cell, out, data_root)
    return start_arguments(cell, out, overrides, data_root)


def skipped_or_announced(cell: Cell, out: Path) -> bool:
    """True (and says so) when `cell` has finished; else says whether it starts or resumes."""
    run = cell.run_dir(out)
    if run.results.is_file():
        print(f"[grid] {run.path.name}: finished, skipped")
        return True
    print(f"[grid] {run.path.name}: {'resuming' if run.checkpoint.is_file() else 'starting'}", flush=True)
    return False


def run_cell(cell: Cell, out: Path, overrides: list[str], data_root: str | None, jobs: int = 1,
             stop: Stop | None = None) -> int:
    """Skip a finished cell, resume a started one, start a new one; returns train.py's exit code. With
    jobs > 1 the cell runs in its own process with cores / jobs threads, its output in <out>/logs/; with one job
    it runs in this process, stopped by `stop` (as train.main's)."""
    run = cell.run_dir(out)
    if skipped_or_announced(cell, out):
        return 0
    arguments = cell_arguments(cell, out, overrides, data_root)
    if jobs == 1:
        return train.main(arguments, stop)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    (out / "logs").mkdir(exist_ok=True)
    with (out / "logs" / f"{run.path.name}.log").open("a") as log:
        code = subprocess.call([sys.executable, str(Path(train.__file__).resolve()), *arguments],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads})
    print(f"[grid] {run.path.name}: {'done' if code == 0 else f'exit code {code}'}", flush=True)
    return code


class GridInterrupted(Exception):
    """A cell was stopped on request (exit code 130): the grid stops, to be continued by the same command."""


def cell_processes(cell: Cell, overrides: list[str]) -> int:
    """The processes `cell`'s config asks for (`processes: N`, run under torchrun), 1 when it names none."""
    return cell_config(cell, overrides).get("processes") or 1


def cell_command(cell: Cell, args: argparse.Namespace) -> RunCommand:
    """`cell` as a SLURM job's command, with absolute paths: train.py, or torchrun with the config's processes;
    OMP_NUM_THREADS splits the job's cores over them."""
    out, data_root = args.out.resolve(), args.data_root and str(Path(args.data_root).resolve())
    cell = replace(cell, config=cell.config.resolve())
    processes = cell_processes(cell, args.overrides)
    script = str(Path(train.__file__).resolve())
    launch = [sys.executable, script] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script]
    run = cell.run_dir(out)
    return RunCommand(run.path.name, (*launch, *start_arguments(cell, out, args.overrides, data_root)),
                      (*launch, *resume_arguments(cell, out, data_root)), run.checkpoint,
                      {"OMP_NUM_THREADS": str(max(1, args.slurm.cpus // processes))})


def slurm_cells(cells: list[Cell], args: argparse.Namespace) -> list[int]:
    """Run `cells` as SLURM jobs, one per cell, and wait for them; their exit codes (finished cells are skipped, not
    submitted: 0)."""
    todo = [cell for cell in cells if not skipped_or_announced(cell, args.out)]
    codes = SlurmLauncher(args.out / SLURM_FOLDER, args.slurm).run([cell_command(c, args) for c in todo]) if todo \
        else []
    by_cell = dict(zip(todo, codes, strict=True))
    return [by_cell.get(cell, 0) for cell in cells]


def run_cells(cells: list[Cell], args: argparse.Namespace) -> list[str]:
    """Run `cells`, `args.jobs` at a time (or as SLURM jobs); the run folder names of those that failed.
    GridInterrupted when a cell was stopped (after the cells already running have ended)."""

    def one(cell: Cell) -> int:
        code = run_cell(cell, args.out, args.overrides, args.data_root, args.jobs, args.stop)
        if code == 130 and args.jobs == 1:
            raise GridInterrupted
        return code

    if args.launcher == "slurm":
        codes = slurm_cells(cells, args)
    elif args.jobs == 1:
        codes = [one(cell) for cell in cells]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(one, cells))
        if 130 in codes:
            raise GridInterrupted
    return [cell.run_dir(args.out).path.name for cell, code in zip(cells, codes, strict=True) if code != 0]


def final_validation(cells: list[Cell], out: Path) -> float:
    """Mean final validation metric of `cells` (lower is better); inf when a cell has no results (diverged)."""
    values = []
    for cell in cells:
        results = cell.run_dir(out).results
        if not results.is_file():
            return math.inf
        record = json.loads(results.read_text())
        key = next(k for k in ("val_error", "val_mse") if k in record)
        values.append(record[key])
    return statistics.fmean(values)


def choose_swept_value(swept: dict[str, list[Cell]], key: str, out: Path) -> str:
    """The swept value with the lowest mean final validation metric over the swept seeds; recorded in
    <out>/sweep.json."""
    scores = {value: final_validation(cells, out) for value, cells in swept.items()}
    chosen = min(scores, key=lambda v: scores[v])
    if math.isinf(scores[chosen]):
        raise RuntimeError(f"no value of {key} finished on every seed; nothing to choose from")
    record = {"key": key, "baseline": next(iter(swept.values()))[0].label.split("@")[0], "chosen": chosen,
              "criterion": "lowest mean final validation metric over the seeds",
              "seeds": [c.seed for c in next(iter(swept.values()))],
              "mean_val": {v: (None if math.isinf(m) else m) for v, m in scores.items()}}
    (out / SWEEP_FILE).write_text(json.dumps(record, indent=1))
    return chosen


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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Student's t 0.975 quantiles by degrees of freedom (a two-sided 95% interval); between the rows, the row below
# (a wider interval); beyond the last, the normal's.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def ci95(values: list[float]) -> float | None:
    """Half-width of the 95% t-interval of the mean of `values` (seeds), None for fewer than two."""
    if len(values) < 2:
        return None
    dof = len(values) - 1
    quantile = T_975[max(d for d in T_975 if d <= dof)] if dof <= max(T_975) else 1.960
    return quantile * statistics.stdev(values) / math.sqrt(len(values))


def paired(results: list[dict[str, Any]], baseline: dict[int, dict[str, Any]], key: str) -> list[float]:
    """Seed by seed, `key` of `results` minus the baseline's, over the seeds both have."""
    return [r[key] - baseline[r["seed"]][key] for r in results if r.get("seed") in baseline and key in r]


def summary_rows(groups: dict[str, list[tuple[Path, dict[str, Any]]]], baseline: str | None = None
                 ) -> list[dict[str, Any]]:
    """Per label: the final test metric's mean, sample std, 95% t-interval over the seeds, number and list of seeds
    and per-seed values, the mean reported 95% CI (episodic runs); where runs select on validation, the test metric
    at the best validation evaluation too; the training compute and phase 1's offline meta steps; and, beside a
    baseline label, each reading's paired difference to it (mean, std, 95% t-interval over the common seeds) and
    the training compute as a multiple of the baseline's on the same seed."""
    base = {r.get("seed"): r for _, r in groups.get(baseline, [])} if baseline else {}
    rows = []
    for label, cells in groups.items():
        results = [r for _, r in cells]
        metric = final_metric(results[0])
        mean, std = mean_std([r[metric] for r in results])
        cis = [r["test_ci95"] for r in results if "test_ci95" in r]
        row: dict[str, Any] = {
            "method": label, "metric": metric, "n": len(results), "mean": mean, "std": std,
            "ci95_seeds": ci95([r[metric] for r in results]),
            "ci95": statistics.fmean(cis) if cis else None, "seeds": " ".join(str(r.get("seed", "")) for r in results),
            "per_seed": " ".join(f"{r[metric]:.4f}" for r in results),
        }
        selected = f"{metric}_at_best_val"
        if all(selected in r for r in results):
            row["mean_at_best_val"], row["std_at_best_val"] = mean_std([r[selected] for r in results])
            row["ci95_seeds_at_best_val"] = ci95([r[selected] for r in results])
            row["per_seed_at_best_val"] = " ".join(f"{r[selected]:.4f}" for r in results)
            row["min_evaluations"] = min(r["evaluations"] for r in results)
        row["compute_s"] = statistics.fmean(r["compute_s"] for r in results) if all(
            "compute_s" in r for r in results) else None
        row["init_steps"] = max((r.get("init_steps", 0) for r in results), default=0)
        if base and label != baseline:
            for reading, key in (("final", metric), ("at_best_val", selected)):
                diffs = paired(results, base, key)
                if diffs:
                    row[f"diff_{reading}"], row[f"diff_{reading}_std"] = mean_std(diffs)
                    row[f"diff_{reading}_ci95"] = ci95(diffs)
            costs = paired_ratio(results, base, "compute_s")
            if costs:
                row["cost"] = statistics.fmean(costs)
        rows.append(row)
    return rows


def paired_ratio(results: list[dict[str, Any]], baseline: dict[int, dict[str, Any]], key: str) -> list[float]:
    """Seed by seed, `key` of `results` over the baseline's."""
    return [r[key] / baseline[r["seed"]][key] for r in results
            if r.get("seed") in baseline and r.get(key) and baseline[r["seed"]].get(key)]


def _interval(mean: float, half_width: float | None, signed: bool = False) -> str:
    """"0.1234 ± 0.0056" (a 95% interval), or the mean alone where there is none (one seed)."""
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if half_width is None else f"{text} ± {half_width:.4f}"


def _paired(row: dict[str, Any], reading: str) -> str:
    key = f"diff_{reading}"
    return _interval(row[key], row[f"{key}_ci95"], signed=True) if key in row else ""


def summary_table(rows: list[dict[str, Any]], baseline: str | None) -> list[str]:
    """The summary's main table: each reading's mean with its 95% t-interval over the seeds and its std, the paired
    differences to the baseline with their 95% t-intervals, the compute and phase 1's steps."""
    versus = f" vs {baseline}" if baseline else ""
    lines = ["| method | metric | seeds (n) | final: mean ± 95% CI | std | at best val: mean ± 95% CI | std "
             f"| paired diff at best val{versus} (± 95% CI) | paired diff final (± 95% CI) | training compute (s) "
             "| compute x baseline | phase-1 steps | reported 95% CI (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        selected = (f"{_interval(r['mean_at_best_val'], r['ci95_seeds_at_best_val'])} | {r['std_at_best_val']:.4f}"
                    if "mean_at_best_val" in r else " | ")
        time = f"{r['compute_s']:.1f}" if r.get("compute_s") is not None else ""
        cost = f"{r['cost']:.2f}" if "cost" in r else ("1.00 (baseline)" if r["method"] == baseline else "")
        reported = f"± {r['ci95']:.4f}" if r["ci95"] is not None else ""
        lines.append(f"| {r['method']} | {r['metric']} | {r['n']} | {_interval(r['mean'], r['ci95_seeds'])} "
                     f"| {r['std']:.4f} | {selected} | {_paired(r, 'at_best_val')} | {_paired(r, 'final')} | {time} "
                     f"| {cost} | {r['init_steps'] or ''} | {reported} |")
    return lines


def per_seed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every seed's final and validation-selected test metric."""
    lines = ["", "Per seed (final / at the best validation evaluation):", "", "| method | seeds | final "
             "| at best val |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seeds']} | {r['per_seed']} | {r.get('per_seed_at_best_val', '')} |")
    return lines


def write_summary(out: Path, rows: list[dict[str, Any]], target: Path, baseline: str | None = None) -> None:
    """summary.csv and summary.md of grid `out`'s `rows` in `target`; the latter also names the cells of those
    labels that have no results (diverged, stopped or still running), which the means leave out."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with (target / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    if (out / SWEEP_FILE).is_file():
        sweep = json.loads((out / SWEEP_FILE).read_text())
        scores = ", ".join(f"{v}: {'diverged' if m is None else f'{m:.4f}'}" for v, m in sweep["mean_val"].items())
        lines += [f"{sweep['baseline']} tuned over {sweep['key']} by the {sweep['criterion']} ({scores}): "
                  f"**{sweep['key']} = {sweep['chosen']}**; the other methods ran at that value.", ""]
    ratios = grid_record(out).get("compute_ratios", {})
    if ratios:
        lines += ["Equal-compute cells ran at the measured training-compute ratio of their reference to the baseline "
                  "(steps and lr milestones scaled by it): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                  + ". Read equal-compute verdicts from the validation-selected column.", ""]
    lines += summary_table(rows, baseline)
    lines.append("\n95% CIs are Student's t intervals over the seeds (paired differences: over the seeds both labels "
                 "ran). Training compute is results.json's compute_s: the training steps' CPU seconds on a CPU, wall "
                 "seconds on a GPU, evaluations excluded, phase 1's offline meta steps (AdaLFL, ML3) included.")
    lines += per_seed_table(rows)
    sparse = [r["method"] for r in rows if r.get("min_evaluations", MIN_EVALUATIONS) < MIN_EVALUATIONS]
    if sparse:
        lines.append(f"\nToo few evaluations to select on validation (fewer than {MIN_EVALUATIONS} in a run): "
                     f"{', '.join(sparse)}; lower train.eval_every")
    labels = {r["method"] for r in rows}
    unfinished = sorted(p.name for p in out.glob("*-seed*") if p.is_dir() and not (p / "results.json").exists()
                        and (target == out or p.name.rsplit("-seed", 1)[0] in labels))
    if unfinished:
        lines.append(f"\nCells without results (diverged, stopped or running): {', '.join(unfinished)}")
    (target / "summary.md").write_text("\n".join(lines) + "\n")


def write_figures(out: Path, groups: dict[str, list[tuple[Path, dict[str, Any]]]],
                  rows: list[dict[str, Any]], evolution_seed: int | None = None) -> list[Path]:
    """The grid's figures (each a PNG and a PDF); a figure that would be empty is left out with a message saying
    why. `evolution_seed`: the learned loss's evolution of that seed only (default: every seed)."""
    written: list[Path] = []
    colours = figures.label_colours(list(groups), METHOD_COLOURS)  # one colour per label in every figure
    metric = final_metric(next(iter(groups.values()))[0][1])
    task_loss = "squared error" if metric == "test_mse" else "cross-entropy"

    def draw(name: str, figure: Callable[[], list[Path]]) -> None:
        try:
            written.extend(figure())
        except figures.NothingToDraw as reason:
            print(f"[grid] no {name}: {reason}")

    histories = {label: [r["history"] for _, r in cells] for label, cells in groups.items()
                 if all(r.get("history") for _, r in cells)}
    if histories:
        draw("learning_curves.png", lambda: figures.learning_curves(
            histories, metric.removeprefix("test_"), out / "learning_curves.png", colours))
    for key, name, steps in (("readouts", "readouts.png", "gradient steps"),  # phase 1's at the phase-2 init
                             ("init_readouts", "init_readouts.png", "offline meta steps")):
        readouts = {label: [r[key] for _, r in cells] for label, cells in groups.items()
                    if all(r.get(key) for _, r in cells)}
        if readouts:
            draw(name, lambda readouts=readouts, name=name, steps=steps: figures.readout_curves(
                readouts, out / name, steps, colours, task_loss))
    for label, cells in groups.items():
        shapes = {r.get("seed", 0): folder / "loss_shapes.json" for folder, r in cells
                  if evolution_seed is None or r.get("seed") == evolution_seed}
        shapes = {seed: json.loads(path.read_text()) for seed, path in shapes.items() if path.is_file()}
        if shapes:
            written.extend(figures.loss_evolution(shapes, label, out / f"loss_evolution_{label}.png"))
    for label, cells in groups.items():  # episodic cells: the learned loss's terms, from their events
        terms = [scalar_series(folder, LOSS_TERMS) for folder, r in cells if "test_accuracy" in r]
        if terms and len(terms) == len(cells) and all(terms):
            draw(f"loss_terms_{label}.png", lambda terms=terms, label=label: figures.loss_terms(
                terms, label, out / f"loss_terms_{label}.png"))
    accuracy = [r for r in rows if r["metric"] == "test_accuracy"]
    if accuracy:
        written.extend(figures.accuracy_bars(accuracy, out / "accuracy.png"))
    return written


def summarise(out: Path, labels: list[str] | None = None, evolution_seed: int | None = None) -> list[dict[str, Any]]:
    """summary.csv, summary.md and the figures of every finished cell in `out` (or, given `labels`, of those
    labels' cells, in <out>/selection/); returns the summary rows."""
    groups = load_results(out)
    if not groups:
        raise FileNotFoundError(f"no finished cells (<method>-seed<k>/results.json) in {out}")
    target = out
    if labels:
        missing = [label for label in labels if label not in groups]
        if missing:
            raise FileNotFoundError(f"no finished cells of {', '.join(missing)} in {out}; its labels: "
                                    f"{', '.join(groups)}")
        groups, target = {label: groups[label] for label in labels}, out / "selection"
        target.mkdir(exist_ok=True)
    baseline = grid_baseline(out)
    rows = summary_rows(groups, baseline if baseline in groups else None)
    write_summary(out, rows, target, baseline if baseline in groups else None)
    for path in write_figures(target, groups, rows, evolution_seed):
        print(f"[grid] wrote {path}")
    print((target / "summary.md").read_text())
    return rows


def grid_record(out: Path) -> dict[str, Any]:
    """<out>/grid.json: the baseline label and the compute ratios chosen so far ({} before the first run)."""
    path = out / GRID_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_grid_record(out: Path, **values: Any) -> None:
    write_text_atomic(out / GRID_FILE, json.dumps(grid_record(out) | values, indent=1))


def grid_baseline(out: Path) -> str | None:
    """The label the paired differences and compute ratios are taken against: the first method (after a sweep,
    at its chosen value), as the run recorded it."""
    if "baseline" in grid_record(out):
        return grid_record(out)["baseline"]
    if (out / SWEEP_FILE).is_file():
        sweep = json.loads((out / SWEEP_FILE).read_text())
        return f"{sweep['baseline']}@{sweep['key']}={sweep['chosen']}"
    return None


def mean_training_time(cells: list[Cell], out: Path) -> float | None:
    """Mean training compute (results.json's compute_s) of the finished `cells`; None when none finished."""
    times = [json.loads(c.run_dir(out).results.read_text())["compute_s"] for c in cells
             if c.run_dir(out).results.is_file()]
    return statistics.fmean(times) if times else None


def compute_ratio(reference: list[Cell], baseline: list[Cell], out: Path) -> float:
    """The reference label's training compute over the baseline's, measured in this grid; recorded in grid.json
    the first time, so that a resumed grid runs its equal-compute cells at the same budget."""
    label = reference[0].label
    ratios = grid_record(out).get("compute_ratios", {})
    if label not in ratios:
        numerator, denominator = mean_training_time(reference, out), mean_training_time(baseline, out)
        if numerator is None or denominator is None:
            raise RuntimeError(f"no finished cell of {label if numerator is None else baseline[0].label} to measure "
                               f"the compute of {label} against; run those cells first")
        update_grid_record(out, compute_ratios=ratios | {label: numerator / denominator})
    return grid_record(out)["compute_ratios"][label]


def at_compute(cell: Cell, ratio: float, baseline: Cell, out: Path) -> Cell:
    """`cell` with its steps and lr milestones stretched by `ratio` from the baseline cell's resolved config."""
    config = yaml.safe_load(baseline.run_dir(out).config.read_text())
    steps = max(1, round(config["train"]["steps"] * ratio))
    milestones = ",".join(str(round(m * ratio)) for m in config["optimizer"]["milestones"])
    return replace(cell, sets=(*cell.sets, f"train.steps={steps}", f"optimizer.milestones=[{milestones}]"))


def equal_compute_cells(cells: list[Cell], all_cells: list[Cell], baseline: list[Cell], out: Path) -> list[Cell]:
    """The METHOD@compute=LABEL cells at the compute LABEL's finished cells measured (seed by seed, the same
    baseline seed's config)."""
    by_seed = {c.seed: c for c in baseline}
    return [at_compute(c, compute_ratio([r for r in all_cells if r.label == c.compute_of], baseline, out),
                       by_seed[c.seed], out) for c in cells]


def cell_config(cell: Cell, overrides: list[str]) -> dict[str, Any]:
    """`cell`'s full config before validation: its config file, its seed, --set, the label's own and swept
    settings."""
    data = load_yaml(cell.config)
    for assignment in [f"seed={cell.seed}", *overrides, *cell.sets]:
        apply_override(data, assignment)
    return data


def check_cells(cells: list[Cell], overrides: list[str], launcher: str = "local") -> None:
    """Before any cell runs: every METHOD@compute=LABEL names a label of the grid, every cell's full config
    (base config, --set, the label's own and swept settings) is valid, and a cell that asks for several processes
    runs on a launcher that starts them; one ConfigError lists every bad cell."""
    labels = {c.label for c in cells}
    problems = []
    for cell in cells:
        if cell.compute_of is not None and cell.compute_of not in labels:
            problems.append(f"{cell.label}: no label {cell.compute_of!r} in --methods to take the compute of; "
                            f"labels: {', '.join(sorted(labels))}")
        try:
            config, _ = resolve_config(cell_config(cell, overrides), train.FAMILIES)
        except ConfigError as exc:
            problems.append(f"{cell.label}: {exc}")
            continue
        if launcher == "local" and (config.processes or 1) > 1:
            problems.append(f"{cell.label}: processes = {config.processes} runs a cell under torchrun, which "
                            "--launcher slurm does; use it, or set processes=null to run the cell here")
    if problems:
        raise ConfigError("the grid has bad cells; nothing was run:\n  " + "\n  ".join(dict.fromkeys(problems)))


def run_grid(args: argparse.Namespace) -> list[str]:
    """Run the sweep (if any), the grid's cells, then its equal-compute cells; the cells that failed."""
    args.out.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(args.config, args.methods, args.seeds)
    baseline = method_cells(args.methods[0], args.config, args.seeds)
    tuning = [c for c in baseline if args.sweep_seeds is None or c.seed in args.sweep_seeds]
    swept = sweep_cells(tuning, *args.sweep) if args.sweep is not None else {}
    check_cells([*cells, *(c for group in swept.values() for c in group)], args.overrides, args.launcher)
    failed: list[str] = []
    if args.sweep is not None:
        key, values = args.sweep
        failed += run_cells([c for group in swept.values() for c in group], args)
        chosen = choose_swept_value(swept, key, args.out)
        print(f"[grid] {key} = {chosen} chosen for {baseline[0].label} on validation", flush=True)
        cells = [replace(c, sets=(f"{key}={chosen}", *c.sets)) for c in cells[len(baseline):]]
        baseline = sweep_cells(baseline, key, [chosen])[chosen]
        cells = [c for c in baseline if c not in swept[chosen]] + cells  # the seeds held out of the tuning
    update_grid_record(args.out, baseline=baseline[0].label)
    plain = [c for c in cells if c.compute_of is None]
    for stage in (plain, [c for c in cells if c.compute_of is not None]):
        if stage and stage[0].compute_of is not None:
            stage = equal_compute_cells(stage, [*baseline, *plain], baseline, args.out)
        failed += run_cells(stage, args)
    return failed


def planned_stages(args: argparse.Namespace) -> list[tuple[str, list[Cell]]]:
    """The grid's cells in the order --launcher slurm submits them, for --dry-run: the sweep's, then the others at
    the value it will choose (KEY=<chosen>), then the equal-compute cells (their steps set by the measured ratio)."""
    cells = grid_cells(args.config, args.methods, args.seeds)
    stages = []
    if args.sweep is not None:
        key, values = args.sweep
        baseline = method_cells(args.methods[0], args.config, args.seeds)
        tuning = [c for c in baseline if args.sweep_seeds is None or c.seed in args.sweep_seeds]
        stages.append(("the sweep", [c for group in sweep_cells(tuning, key, values).values() for c in group]))
        held_out = [c for c in sweep_cells(baseline, key, ["<chosen>"])["<chosen>"] if c.seed not in
                    {t.seed for t in tuning}]
        cells = held_out + [replace(c, sets=(f"{key}=<chosen>", *c.sets)) for c in cells[len(baseline):]]
    stages.append(("after the sweep's choice" if args.sweep else "the grid", [c for c in cells if not c.compute_of]))
    at_compute = [c for c in cells if c.compute_of]
    if at_compute:
        stages.append(("after their reference's cells, their steps scaled by its measured compute", at_compute))
    return stages


def dry_run(args: argparse.Namespace) -> None:
    """Print the SLURM jobs of the grid, stage by stage, submitting nothing."""
    stages = planned_stages(args)
    swept = stages[0][1] if args.sweep is not None else []
    check_cells([*grid_cells(args.config, args.methods, args.seeds), *swept], args.overrides, args.launcher)
    print(f"[grid] dry run: nothing is submitted; logs would go to {args.out.resolve() / SLURM_FOLDER}")
    for title, cells in stages:
        finished = [c.run_dir(args.out).path.name for c in cells if c.run_dir(args.out).results.is_file()]
        todo = [c for c in cells if not c.run_dir(args.out).results.is_file()]
        print(f"[grid] {title}: {len(todo)} job(s)" + (f"; finished, not resubmitted: {', '.join(finished)}"
                                                       if finished else ""))
        if todo:
            print("\n".join(describe([cell_command(c, args) for c in todo], args.slurm)))


def main(argv: list[str] | None = None, stop: Stop | None = None) -> int:
    """compare.py's command line; `stop` is handed to the cells run in this process (train.main's)."""
    args = parse_args(argv)
    args.stop = stop
    failed: list[str] = []
    if args.dry_run:
        try:
            dry_run(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.summary_only:
        try:
            failed = run_grid(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except GridInterrupted:
            print("[grid] interrupted; run the same command again to continue the grid", file=sys.stderr)
            return 130
    try:
        summarise(args.out, args.labels, args.loss_evolution_seed)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"[grid] cells that failed (see their messages above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
