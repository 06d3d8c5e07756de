"""TensorBoard over a logdir of mixed runs: one experiment summary for every family (dotted config keys, every
family's metrics), each run's settings from its start, metrics filled in as they are logged, train/val/test first,
phase 1 under its own tags and run names without a `tensorboard` suffix. Read from the event files the way
TensorBoard's HParams plugin and Time Series read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import train
from engine.hparams import SHOWN, HParamsSpec, log_run_start

SPECS = [HParamsSpec(("method", "seed", "data.dataset", "optimizer.lr"), ("2_val/error", "3_test/error"), dict),
         HParamsSpec(("method", "seed", "data.dataset", "inner.lr"), ("2_val/accuracy",), dict)]


def accumulator(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def read_experiment(log_dir: Path) -> Any:
    content = accumulator(log_dir).PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


def read_hparams(log_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The run's session hyper-parameters, and the latest value of each experiment metric the run has logged."""
    events = accumulator(log_dir)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    hparams = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    logged = set(events.Tags()["scalars"])
    metrics = {m.name.tag: events.Scalars(m.name.tag)[-1].value for m in read_experiment(log_dir).metric_infos
               if m.name.tag in logged}
    return hparams, metrics


def groups(log_dir: Path) -> list[str]:
    """The run's tag groups in the order TensorBoard's Time Series shows them (digits before letters)."""
    tags = accumulator(log_dir).Tags()
    return sorted({tag.split("/")[0] for kind in ("scalars", "images") for tag in tags[kind]})


def test_the_experiment_lists_every_familys_settings_and_metrics_and_the_session_its_values(tmp_path: Path) -> None:
    log_run_start(tmp_path, SPECS, ["ce", "npbml"], {"method": "npbml", "inner.lr": 0.1, "seed": 3, "root": None,
                                                    "milestones": [100, 200], "nesterov": True})
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [tmp_path]
    experiment = read_experiment(tmp_path)
    names = [info.name for info in experiment.hparam_infos]
    assert names == ["method", "seed", "data.dataset", "optimizer.lr", "inner.lr", "world_size"]
    assert {info.name for info in experiment.hparam_infos if info.differs} == set(SHOWN)  # the columns shown
    assert list(experiment.hparam_infos[0].domain_discrete) == ["ce", "npbml"]
    assert [m.name.tag for m in experiment.metric_infos] == ["3_test/error", "2_val/error", "2_val/accuracy"]
    hparams, metrics = read_hparams(tmp_path)
    assert hparams == {"method": "npbml", "inner.lr": 0.1, "seed": 3.0, "root": "None", "milestones": "[100, 200]",
                       "nesterov": "True"}
    assert metrics == {}  # nothing logged yet: the run is listed from its start


def test_a_mixed_logdir_reads_as_one_experiment(tmp_path: Path, shared_data: Path) -> None:
    from test_episodic_train import run as run_episodic
    from test_train_single_task import QUICK, StopAfter, run_train

    assert run_train(tmp_path, shared_data, "adalfl_california", "adalfl", *QUICK, "--set", "model.name=linear") == 0
    code, maml = run_episodic("maml_omniglot_5w1s.yaml", tmp_path, shared_data, "maml")
    assert code == 0
    stopped = StopAfter(6 + 13)  # phase 1 and 13 steps of phase 2: after its first evaluation (step 12)
    assert run_train(tmp_path, shared_data, "mse_california", "stopped", *QUICK, stop=stopped) == 130
    # the run's events are in its folder (TensorBoard names the run after it), phase 1's in a run of its own
    assert {p.relative_to(tmp_path).parent.as_posix() for p in tmp_path.rglob("events.out.tfevents.*")} == {
        "adalfl", "adalfl/phase1", "maml", "stopped"}
    experiments = {read_experiment(tmp_path / run).SerializeToString() for run in ("adalfl", "maml", "stopped")}
    assert len(experiments) == 1  # every run writes the same experiment summary: whichever is read, it fits all
    experiment = read_experiment(maml)
    families = train.FAMILIES
    metrics = [*families[0].hparams.metrics, *families[1].hparams.metrics]
    assert sorted(m.name.tag for m in experiment.metric_infos) == sorted(metrics)
    assert [m.name.tag for m in experiment.metric_infos][:5] == [  # the five the dashboard shows
        "3_test/error", "3_test/error_at_best_val", "3_test/mse", "3_test/mse_at_best_val", "3_test/accuracy"]
    names = {info.name for info in experiment.hparam_infos}
    assert {"method", "seed", "data.dataset", "optimizer.lr", "meta.update_every", "inner.lr", "world_size"} <= names

    hparams, metrics = read_hparams(tmp_path / "adalfl")
    assert hparams["method"] == "adalfl" and hparams["optimizer.lr"] == 0.01 and hparams["seed"] == 0
    assert hparams["data.dataset"] == "california_housing" and hparams["meta.init_steps"] == 6
    assert hparams["meta.batch_source"] == "same" and hparams["world_size"] == 1
    results = json.loads((tmp_path / "adalfl" / "results.json").read_text())
    assert set(metrics) == {"2_val/mse", "3_test/mse", "3_test/mse_at_best_val"}
    assert metrics["3_test/mse"] == pytest.approx(results["test_mse"], rel=1e-6)  # float32 in the events
    assert metrics["3_test/mse_at_best_val"] == pytest.approx(results["test_mse_at_best_val"], rel=1e-6)

    hparams, metrics = read_hparams(maml)
    results = json.loads((maml / "results.json").read_text())
    assert hparams["method"] == "maml" and hparams["data.dataset"] == "omniglot" and hparams["inner.lr"] > 0
    assert hparams["data.ways"] == 5 and hparams["outer.iterations"] == 2 and hparams["seed"] == 0
    assert metrics["3_test/accuracy"] == pytest.approx(results["test_accuracy"], rel=1e-6)
    assert metrics["3_test/ci95"] == pytest.approx(results["test_ci95"], rel=1e-6)
    assert metrics["2_val/best_accuracy"] == pytest.approx(results["best_val_accuracy"], rel=1e-6)

    hparams, metrics = read_hparams(tmp_path / "stopped")  # a stopped run: its settings and what it reached
    assert hparams["method"] == "mse" and set(metrics) == {"2_val/mse", "3_test/mse", "3_test/mse_at_best_val"}

    for run in ("adalfl", "maml", "stopped"):
        assert groups(tmp_path / run)[:3] == ["1_train", "2_val", "3_test"], groups(tmp_path / run)
    assert groups(tmp_path / "adalfl") == ["1_train", "2_val", "3_test", "analysis", "learned_loss"]
    assert groups(tmp_path / "adalfl" / "phase1") == ["phase1"]  # offline meta steps never share phase 2's charts
