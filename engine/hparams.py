"""TensorBoard's HParams dashboard over a logdir of mixed runs (single-task and episodic).

Every run writes, when it starts, the same experiment summary (every family's hyper-parameters, named by their
dotted config keys, and every family's metric tags) and its own session start (its values), so whichever summary
the dashboard reads first describes every run, and a run is listed from its start (a stopped run too). The metrics
are tags the runs log as ordinary scalars (e.g. `3_test/error`): the dashboard shows each one's latest value, so the
columns fill in as a run evaluates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from engine.tags import TEST

# The columns the dashboard shows before any is chosen (it shows five, those marked as differing first).
SHOWN = ("method", "seed", "data.dataset")
WORLD_SIZE = "world_size"  # every run's number of processes, beside its family's settings
RUN_START_SUFFIX = ".run_start"  # the start's event file, told apart from training's (engine/run_dir.py)


@dataclass(frozen=True)
class HParamsSpec:
    """What one family records: `names` (dotted config keys, in column order), the metric tags its runs log,
    and `values(config)`, a run's {name: value} (a subset of `names`)."""

    names: tuple[str, ...]
    metrics: tuple[str, ...]
    values: Callable[[Any], dict[str, Any]]


def hparam_value(value: Any) -> int | float | str:
    """Numbers and strings as they are; anything else (None, a list, a bool, which would read as 1/0) as its
    string form."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return str(value)


def experiment_summary(specs: Sequence[HParamsSpec], methods: Sequence[str]) -> Summary:
    """The one experiment summary of every family: the union of their hyper-parameters (`method` with every
    method as its choices, `SHOWN` marked so that the dashboard shows them) and of their metrics (the test
    readings first: the dashboard shows the first five)."""
    names = list(dict.fromkeys([*(name for spec in specs for name in spec.names), WORLD_SIZE]))
    infos = []
    for name in names:
        info = api_pb2.HParamInfo(name=name, differs=name in SHOWN)
        if name == "method":
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(methods)
        infos.append(info)
    tags = list(dict.fromkeys(tag for spec in specs for tag in spec.metrics))
    tags.sort(key=lambda tag: not tag.startswith(f"{TEST}/"))  # the test readings are the columns shown first
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in tags]
    content = plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics),
                                                version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=SummaryMetadata(plugin_data=plugin))])


def log_run_start(log_dir: Path, specs: Sequence[HParamsSpec], methods: Sequence[str],
                  values: dict[str, Any]) -> None:
    """Write the experiment summary of `specs` and this run's session start (`values`) into `log_dir`'s own
    events (not a timestamped sub-folder), at step 0."""
    with SummaryWriter(log_dir, filename_suffix=RUN_START_SUFFIX) as writer:
        file_writer = writer._get_file_writer()
        file_writer.add_summary(experiment_summary(specs, methods))
        _, session_start, _ = hparams_summaries({k: hparam_value(v) for k, v in values.items()}, {})
        file_writer.add_summary(session_start)
