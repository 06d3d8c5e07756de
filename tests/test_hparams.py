"""TensorBoard HParams: a run's hyper-parameters and final metrics land in its own event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from engine.hparams import log_hparams


def read_hparams(log_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The hyper-parameters of the HParams plugin's session in `log_dir`, and its `hparams/*` scalars."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {name: getattr(value, value.WhichOneof("kind"))
               for name, value in start.session_start_info.hparams.items()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag: events.Scalars(m.name.tag)[-1].value for m in experiment.metric_infos}
    return hparams, metrics


def test_hparams_land_in_the_run_folder(tmp_path: Path) -> None:
    log_hparams(tmp_path, {"method": "npbml", "inner.lr": 0.1, "data.ways": 5, "root": None,
                           "milestones": [100, 200], "nesterov": True},
                {"hparams/test_accuracy": 0.75, "hparams/test_ci95": 0.125})
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [tmp_path] * 2
    hparams, metrics = read_hparams(tmp_path)
    assert hparams == {"method": "npbml", "inner.lr": 0.1, "data.ways": 5.0, "root": "None",
                       "milestones": "[100, 200]", "nesterov": "True"}
    assert metrics == {"hparams/test_accuracy": 0.75, "hparams/test_ci95": 0.125}  # exact in float32


def test_a_single_task_run_records_its_settings_and_final_metrics(tmp_path: Path, shared_data: Path) -> None:
    from test_train_single_task import QUICK, run_train

    assert run_train(tmp_path, shared_data, "adalfl_california", "run", *QUICK, "--set", "model.name=linear") == 0
    hparams, metrics = read_hparams(tmp_path / "run" / "tensorboard")
    assert hparams["method"] == "adalfl" and hparams["lr"] == 0.01 and hparams["batch_source"] == "same"
    assert hparams["init_steps"] == 6 and hparams["seed"] == 0 and hparams["dataset"] == "california_housing"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(metrics) == {"hparams/test_mse", "hparams/val_mse", "hparams/test_mse_at_best_val"}
    assert metrics["hparams/test_mse"] == pytest.approx(results["test_mse"], rel=1e-6)  # float32 in the events
    assert metrics["hparams/test_mse_at_best_val"] == pytest.approx(results["test_mse_at_best_val"], rel=1e-6)
