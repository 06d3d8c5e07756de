"""Reading a run's own TensorBoard scalars back: what compare.py draws from tags a run logs but does not put in
results.json (the episodic trainer's learned-loss terms)."""

from __future__ import annotations

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

LEGACY_EVENTS = "tensorboard"  # run folders made before 2026-12-03 keep their events here


def scalar_series(run: Path, prefix: str) -> list[dict[str, float]]:
    """The run's scalars whose tags start with `prefix`, one record per step: {"step", <tag without prefix>...}
    (events in the run folder itself, or in its legacy `tensorboard/`; sub-runs such as phase1/ are not read)."""
    folder = run if any(run.glob("events.out.tfevents.*")) else run / LEGACY_EVENTS
    if not any(folder.glob("events.out.tfevents.*")):
        return []
    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    quiet = logging.getLogger("tensorboard")  # a resumed run's purged steps are reported as a warning each
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        quiet.setLevel(level)
    by_step: dict[int, dict[str, float]] = {}
    for tag in events.Tags()[SCALARS]:
        if tag.startswith(prefix):
            for event in events.Scalars(tag):
                by_step.setdefault(event.step, {"step": event.step})[tag.removeprefix(prefix)] = event.value
    return [by_step[step] for step in sorted(by_step)]
