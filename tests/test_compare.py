"""compare.py: a tiny grid end to end, resume of a half-done grid, accuracy summaries, label smoothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_train_single_task import MNIST_QUICK, StopAfter, expect_error, run_train

import compare

TINY = [
    "train.steps=12", "train.eval_every=6", "train.checkpoint_every=4", "meta.init_steps=3",
    "log.scalars_every=3", "log.loss_shape_every=6", "model.name=linear", "device=cpu",
]


def run_grid(out: Path, data: Path, methods: list[str], seeds: list[str], stop: StopAfter | None = None) -> int:
    sets = [arg for s in TINY for arg in ("--set", s)]
    return compare.main([
        "--config", "configs/adalfl_california.yaml", "--methods", *methods, "--seeds", *seeds,
        "--out", str(out), "--data-root", str(data), *sets,
    ], stop)


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_a_tiny_grid_runs_every_cell_and_writes_summaries_and_figures(tmp_path, shared_data, capsys) -> None:
    out = tmp_path / "grid"
    assert run_grid(out, shared_data, ["mse", "adalfl"], ["0", "1"]) == 0
    assert "[grid] no init_readouts.png: every run recorded its readouts once" in capsys.readouterr().out
    for cell in ("mse-seed0", "mse-seed1", "adalfl-seed0", "adalfl-seed1"):
        results = json.loads((out / cell / "results.json").read_text())
        assert results["method"] == cell.split("-")[0] and results["seed"] == int(cell[-1])
    summary = read_summary(out)
    assert list(summary) == ["mse", "adalfl"]
    for method in summary:
        values = [json.loads((out / f"{method}-seed{s}" / "results.json").read_text())["test_mse"] for s in (0, 1)]
        row = summary[method]
        assert row["metric"] == "test_mse" and row["n"] == "2"
        assert float(row["mean"]) == pytest.approx(sum(values) / 2)
    assert "| adalfl | test_mse | 2 |" in (out / "summary.md").read_text()
    for figure in ("learning_curves", "readouts", "loss_evolution_adalfl"):  # phase 1's 3 steps: one readout
        assert (out / f"{figure}.png").stat().st_size > 1_000 and (out / f"{figure}.pdf").stat().st_size > 1_000
    assert not (out / "loss_evolution_mse.png").exists() and not (out / "accuracy.png").exists()


def test_a_half_done_grid_skips_finished_cells_and_resumes_started_ones(tmp_path, shared_data, monkeypatch,
                                                                         capsys) -> None:
    out = tmp_path / "grid"
    stop = StopAfter(12 + 3 + 5)  # all of mse-seed0, then adalfl-seed0's phase 1 and 5 steps
    assert run_grid(out, shared_data, ["mse", "adalfl"], ["0"], stop) == 130
    assert (out / "mse-seed0" / "results.json").exists() and (out / "adalfl-seed0" / "checkpoint.pt").exists()
    assert not (out / "adalfl-seed0" / "results.json").exists()
    assert compare.main(["--out", str(out), "--summary-only"]) == 0
    assert "Cells without results (diverged, stopped or running): adalfl-seed0" in (out / "summary.md").read_text()
    finished = (out / "mse-seed0" / "results.json").stat().st_mtime_ns

    capsys.readouterr()
    assert run_grid(out, shared_data, ["mse", "adalfl"], ["0"]) == 0
    printed = capsys.readouterr().out
    assert "mse-seed0: finished, skipped" in printed and "adalfl-seed0: resuming" in printed
    assert (out / "mse-seed0" / "results.json").stat().st_mtime_ns == finished
    assert json.loads((out / "adalfl-seed0" / "results.json").read_text())["steps"] == 12
    assert set(read_summary(out)) == {"mse", "adalfl"}


def test_accuracy_results_get_confidence_intervals_and_a_bar_chart(tmp_path) -> None:
    """Episodic (NPBML) runs report test_accuracy and test_ci95; ablations are labelled cells."""
    cells = {"npbml-seed0": (0.60, 0.010), "npbml-seed1": (0.64, 0.012), "no_loss-seed0": (0.55, 0.011)}
    for name, (accuracy, ci) in cells.items():
        (tmp_path / name).mkdir()
        results = {"method": "npbml", "seed": int(name[-1]), "test_accuracy": accuracy, "test_ci95": ci}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    assert compare.main(["--out", str(tmp_path), "--summary-only"]) == 0
    summary = read_summary(tmp_path)
    assert float(summary["npbml"]["mean"]) == pytest.approx(0.62)
    assert float(summary["npbml"]["std"]) == pytest.approx(0.0282843, rel=1e-4)
    assert float(summary["npbml"]["ci95"]) == pytest.approx(0.011)
    assert summary["no_loss"]["n"] == "1" and summary["no_loss"]["metric"] == "test_accuracy"
    assert (tmp_path / "accuracy.png").stat().st_size > 1_000


def test_a_selection_of_labels_is_summarised_apart(tmp_path, capsys) -> None:
    cells = {"npbml-seed0": 0.60, "maml-seed0": 0.50, "metasgd-seed0": 0.55}
    for name, accuracy in cells.items():
        (tmp_path / name).mkdir()
        results = {"method": name.split("-")[0], "seed": 0, "test_accuracy": accuracy, "test_ci95": 0.01}
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "maml-seed1").mkdir()  # unfinished
    assert compare.main(["--out", str(tmp_path), "--summary-only", "--labels", "npbml", "maml"]) == 0
    assert list(read_summary(tmp_path / "selection")) == ["npbml", "maml"]
    assert "maml-seed1" in (tmp_path / "selection" / "summary.md").read_text()
    assert not (tmp_path / "summary.csv").exists()  # the grid's own summary is not touched
    expect_error(capsys, compare.main(["--out", str(tmp_path), "--summary-only", "--labels", "mam"]),
                 "no finished cells of mam", "maml")
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--labels", "maml"])


def test_labelled_configs_and_empty_grids(tmp_path, capsys) -> None:
    cells = compare.grid_cells(Path("base.yaml"), ["ce", "abl=configs/other.yaml"], [0, 1])
    assert [(c.label, c.seed, str(c.config), c.own_config) for c in cells] == [
        ("ce", 0, "base.yaml", False), ("ce", 1, "base.yaml", False),
        ("abl", 0, "configs/other.yaml", True), ("abl", 1, "configs/other.yaml", True),
    ]
    expect_error(capsys, compare.main(["--out", str(tmp_path), "--summary-only"]), "no finished cells")


def test_label_smoothing_zero_is_cross_entropy_and_needs_classes(tmp_path, shared_data, capsys) -> None:
    short = [*MNIST_QUICK, "--set", "train.steps=4", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4"]
    smoothing = [*short, "--set", "method=label_smoothing"]
    assert run_train(tmp_path, shared_data, "ce_mnist", "ce", *short) == 0
    assert run_train(tmp_path, shared_data, "ce_mnist", "ls0", *smoothing, "--set", "label_smoothing=0") == 0
    assert run_train(tmp_path, shared_data, "ce_mnist", "ls", *smoothing) == 0
    ce, ls0, ls = (json.loads((tmp_path / n / "results.json").read_text())["history"] for n in ("ce", "ls0", "ls"))
    assert ls0 == ce and ls != ce
    code = run_train(tmp_path, shared_data, "mse_california", "bad", *smoothing)
    expect_error(capsys, code, "label_smoothing needs a classification", "use mse")


def test_variant_labels_carry_their_own_overrides(tmp_path) -> None:
    cells = compare.grid_cells(Path("base.yaml"), ["adalfl", "same=adalfl,meta.batch_source=same,seed=9",
                                                    "ctl=ce,optimizer.lr_multipliers_from=g/adalfl-seed{seed}",
                                                    "lq=npbml,components.loss_terms=[query,support],seed=1"], [0])
    assert [(c.label, c.sets) for c in cells] == [
        ("adalfl", ("method=adalfl",)), ("same", ("method=adalfl", "meta.batch_source=same", "seed=9")),
        ("ctl", ("method=ce", "optimizer.lr_multipliers_from=g/adalfl-seed0")),
        ("lq", ("method=npbml", "components.loss_terms=[query,support]", "seed=1")),  # a list value stays whole
    ]
    arguments = compare.cell_arguments(cells[1], tmp_path, ["meta.batch_source=validation"], None)
    sets = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    assert sets.index("meta.batch_source=same") > sets.index("meta.batch_source=validation")  # the cell's own win


def test_a_swept_baseline_picks_its_value_on_validation_and_the_others_run_there(tmp_path, shared_data) -> None:
    """mse at lr 1e-4 barely moves in 12 steps, so lr 0.03 wins on validation; adalfl then runs at 0.03,
    two cells at a time in their own processes."""
    out = tmp_path / "grid"
    sets = [arg for s in TINY for arg in ("--set", s)]
    code = compare.main([
        "--config", "configs/adalfl_california.yaml", "--methods", "mse", "adalfl", "--seeds", "0", "1",
        "--sweep", "optimizer.lr=0.0001,0.03", "--jobs", "2", "--out", str(out), "--data-root", str(shared_data),
        *sets,
    ])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    val = {lr: [json.loads((out / f"mse@optimizer.lr={lr}-seed{s}" / "results.json").read_text())["val_mse"]
                for s in (0, 1)] for lr in ("0.0001", "0.03")}
    assert sweep["mean_val"] == {lr: pytest.approx(sum(v) / 2) for lr, v in val.items()}
    assert sweep["chosen"] == min(val, key=lambda lr: sum(val[lr])) == "0.03"
    for seed in (0, 1):
        assert "lr: 0.03" in (out / f"adalfl-seed{seed}" / "config.yaml").read_text()
        assert (out / "logs" / f"adalfl-seed{seed}.log").is_file()
    summary = read_summary(out)
    assert set(summary) == {"mse@optimizer.lr=0.0001", "mse@optimizer.lr=0.03", "adalfl"}
    assert "**optimizer.lr = 0.03**" in (out / "summary.md").read_text()


def test_a_sweep_tuned_on_some_seeds_runs_the_held_out_seeds_only_at_the_chosen_value(tmp_path, shared_data) -> None:
    out = tmp_path / "grid"
    sets = [arg for s in TINY for arg in ("--set", s)]
    assert compare.main([
        "--config", "configs/adalfl_california.yaml", "--methods", "mse", "--seeds", "0", "1", "2",
        "--sweep", "optimizer.lr=0.0001,0.03", "--sweep-seeds", "0", "1", "--out", str(out),
        "--data-root", str(shared_data), *sets,
    ]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["seeds"] == [0, 1] and sweep["chosen"] == "0.03"
    val = [json.loads((out / f"mse@optimizer.lr=0.0001-seed{s}" / "results.json").read_text())["val_mse"]
           for s in (0, 1)]
    assert sweep["mean_val"]["0.0001"] == pytest.approx(sum(val) / 2)
    assert not (out / "mse@optimizer.lr=0.0001-seed2").exists()
    assert (out / "mse@optimizer.lr=0.03-seed2" / "results.json").is_file()
    assert read_summary(out)["mse@optimizer.lr=0.03"]["n"] == "3"


def test_sweep_seeds_outside_the_grid_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args(["--config", "configs/adalfl_california.yaml", "--methods", "mse", "--seeds", "0", "1",
                            "--sweep", "optimizer.lr=0.01,0.03", "--sweep-seeds", "2", "--out", "x"])
    assert "--sweep-seeds needs --sweep, and its seeds must be among --seeds" in capsys.readouterr().err


def test_every_label_of_a_figure_gets_its_own_colour() -> None:
    from adalfl.methods import METHOD_COLOURS as COLOURS
    from engine.figures import label_colours

    labels = ["ce", "adalfl", "ml3", *(f"ce@optimizer.lr={v}" for v in (0.01, 0.03, 0.1, 0.3)), "a", "b", "c"]
    colours = label_colours(labels, COLOURS)
    assert colours["adalfl"] == COLOURS["adalfl"] and len(set(map(str, colours.values()))) == len(labels)
    many = [f"variant{i}" for i in range(60)]  # more labels than distinct colours: still one colour each
    spread = label_colours(many, COLOURS)
    assert len(set(map(str, spread.values()))) == 53 and set(spread) == set(many)


def test_a_baseline_at_another_methods_compute_runs_its_measured_budget_and_both_readings_are_summarised(
        tmp_path, shared_data, capsys) -> None:
    out = tmp_path / "grid"
    methods = ["mse", "adalfl_k2=adalfl,meta.update_every=2", "mse@compute=adalfl_k2"]
    sets = [arg for s in [*TINY, "optimizer.milestones=[6]"] for arg in ("--set", s)]
    assert compare.main(["--config", "configs/adalfl_california.yaml", "--methods", *methods, "--seeds", "0", "1",
                         "--out", str(out), "--data-root", str(shared_data), *sets]) == 0
    ratio = json.loads((out / "grid.json").read_text())["compute_ratios"]["adalfl_k2"]
    times = {label: [json.loads((out / f"{label}-seed{s}" / "results.json").read_text())["compute_s"]
                     for s in (0, 1)] for label in ("mse", "adalfl_k2")}
    assert ratio == pytest.approx(sum(times["adalfl_k2"]) / sum(times["mse"]))
    config = (out / "mse@compute=adalfl_k2-seed1" / "config.yaml").read_text()
    assert f"steps: {round(12 * ratio)}\n" in config and f"- {round(6 * ratio)}\n" in config
    results = json.loads((out / "mse@compute=adalfl_k2-seed1" / "results.json").read_text())
    assert results["method"] == "mse" and results["steps"] == round(12 * ratio)

    summary = read_summary(out)
    assert json.loads((out / "grid.json").read_text())["baseline"] == "mse"
    row = summary["mse@compute=adalfl_k2"]
    finals = [json.loads((out / f"mse@compute=adalfl_k2-seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert row["per_seed_at_best_val"] == " ".join(f"{r['test_mse_at_best_val']:.4f}" for r in finals)
    assert row["per_seed"] == " ".join(f"{r['test_mse']:.4f}" for r in finals)
    base = [json.loads((out / f"mse-seed{s}" / "results.json").read_text()) for s in (0, 1)]
    diffs = [f["test_mse_at_best_val"] - b["test_mse_at_best_val"] for f, b in zip(finals, base, strict=True)]
    assert float(row["diff_at_best_val"]) == pytest.approx(sum(diffs) / 2)
    assert float(summary["adalfl_k2"]["cost"]) > 1.0
    text = (out / "summary.md").read_text()
    assert "at best val: mean" in text and "Per seed (final / at the best validation evaluation)" in text
    assert "Too few evaluations to select on validation" in text  # 2 evaluations a run

    expect_error(capsys, compare.main(["--config", "configs/adalfl_california.yaml", "--methods", "mse",
                                       "mse@compute=adalfl", "--out", str(tmp_path / "bad")]),
                 "no label 'adalfl' in --methods")


def test_a_grid_with_bad_cells_is_refused_before_any_cell_runs(tmp_path, capsys) -> None:
    out = tmp_path / "grid"
    code = compare.main(["--config", "configs/adalfl_california.yaml", "--methods", "mse", "adalfI",
                         "deep=adalfl,model.name=mlp3", "mse@compute=nothing", "--sweep", "optimizer.rl=0.1,0.3",
                         "--seeds", "0", "1", "--out", str(out)])
    expect_error(capsys, code, "nothing was run", "adalfI: method = 'adalfI' is not valid (did you mean 'adalfl'?)",
                 "deep: model.name = 'mlp3' is not valid", "no label 'nothing' in --methods",
                 "mse@optimizer.rl=0.1: unknown config key 'optimizer.rl'")
    assert not any(out.glob("*-seed*"))


def test_confidence_intervals_are_t_intervals_over_the_seeds() -> None:
    assert compare.ci95([1.0]) is None
    assert compare.ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3 ** 0.5)  # t(0.975, 2 dof) * std / sqrt(n)
    assert compare.ci95([0.0, 1.0] * 16) == pytest.approx(2.042 * 0.508 / 32 ** 0.5, rel=1e-3)  # 31 dof: row 30


def test_a_summary_has_intervals_compute_and_phase_1_and_its_figures_are_pdf_too(tmp_path, capsys) -> None:
    """Two seeds of ce and ml3 that evaluated once: t-intervals of each mean and of the paired difference, phase 1's
    steps, a message instead of an empty learning-curve figure, the loss's evolution of every seed."""
    shape = {"prediction": [0.0, 0.5, 1.0], "y=1": [2.0, 0.7, 0.0], "y=0": [0.0, 0.7, 2.0]}
    values = {"ce": (0.30, 0.34), "ml3": (0.27, 0.33)}
    for label, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            folder = tmp_path / f"{label}-seed{seed}"
            folder.mkdir()
            results = {"method": label, "seed": seed, "test_error": value, "test_error_at_best_val": value,
                       "evaluations": 1, "compute_s": 2.0 if label == "ml3" else 1.0,
                       "init_steps": 5 if label == "ml3" else 0,
                       "history": [{"step": 10, "val_error": value, "test_error": value}]}
            (folder / "results.json").write_text(json.dumps(results))
            if label == "ml3":  # frozen after phase 1: one phase-2 shape
                shapes = [{"phase": "init", "step": 5, **shape}, {"phase": "online", "step": 0, **shape}]
                (folder / "loss_shapes.json").write_text(json.dumps(shapes))
    (tmp_path / "grid.json").write_text(json.dumps({"baseline": "ce"}))
    assert compare.main(["--out", str(tmp_path), "--summary-only"]) == 0
    assert "[grid] no learning_curves.png: every run evaluated once" in capsys.readouterr().out
    assert not (tmp_path / "learning_curves.png").exists()
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        assert (tmp_path / f"loss_evolution_ml3{suffix}").read_bytes().startswith(magic)
    row = read_summary(tmp_path)["ml3"]
    assert float(row["ci95_seeds"]) == pytest.approx(12.706 * (0.06 / 2 ** 0.5) / 2 ** 0.5)
    diffs = [0.27 - 0.30, 0.33 - 0.34]
    assert float(row["diff_final"]) == pytest.approx(sum(diffs) / 2)
    assert float(row["diff_final_ci95"]) == pytest.approx(12.706 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5)
    assert row["init_steps"] == "5" and float(row["cost"]) == pytest.approx(2.0)
    text = (tmp_path / "summary.md").read_text()
    assert "| ml3 | test_error | 2 | 0.3000 ± 0.3812 |" in text and "| phase-1 steps |" in text
    assert "-0.0200 ± 0.1271" in text  # the paired difference at the best validation evaluation and final


def test_episodic_cells_get_a_figure_of_their_learned_loss_terms_read_from_their_events(tmp_path, capsys) -> None:
    """The learned loss's terms (learned_loss/*_over_ce, logged by the episodic trainer) are read back from each
    cell's events, in the run folder or a legacy tensorboard/ one, and drawn per label; a label whose cells logged
    no terms gets no figure, and one logged once gets a message instead of an empty figure."""
    from torch.utils.tensorboard import SummaryWriter

    from engine.events import scalar_series

    def cell(name: str, seed: int, steps: list[int], legacy: bool = False) -> Path:
        folder = tmp_path / name
        (folder / "results.json").parent.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"method": "npbml", "seed": seed, "test_accuracy": 0.6,
                                                         "test_ci95": 0.01}))
        with SummaryWriter(folder / "tensorboard" if legacy else folder) as writer:
            for step in steps:
                writer.add_scalar("learned_loss/query_over_ce", 0.1 * step, step)
                writer.add_scalar("learned_loss/query_grad_over_ce", 0.2 * step, step)
                writer.add_scalar("1_train/loss", 1.0, step)
        return folder

    first = cell("npbml-seed0", 0, [10, 20])
    cell("npbml-seed1", 1, [10, 20], legacy=True)
    cell("once-seed0", 0, [10])
    (tmp_path / "no_loss-seed0").mkdir()
    (tmp_path / "no_loss-seed0" / "results.json").write_text(json.dumps({"method": "maml", "seed": 0,
                                                                         "test_accuracy": 0.5}))
    records = scalar_series(first, "learned_loss/")
    assert [r["step"] for r in records] == [10, 20]
    assert records[1] == pytest.approx({"step": 20, "query_over_ce": 2.0, "query_grad_over_ce": 4.0})
    assert compare.main(["--out", str(tmp_path), "--summary-only"]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "loss_terms_npbml.png").stat().st_size > 1_000 and (tmp_path / "loss_terms_npbml.pdf").is_file()
    assert "no loss_terms_once.png: the runs logged the learned loss's terms fewer than twice" in printed
    assert not (tmp_path / "loss_terms_once.png").exists() and not (tmp_path / "loss_terms_no_loss.png").exists()
