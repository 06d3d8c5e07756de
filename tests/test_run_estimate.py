"""The projected wall time's format and the step timer's two measurement points."""

from __future__ import annotations

import pytest
import torch

from engine.run_estimate import StepTimer, format_duration


@pytest.mark.parametrize(("seconds", "text"), [(45, "45 s"), (720, "12 min"), (12_240, "3.4 h"),
                                               (9.1 * 86_400, "9.1 days")])
def test_durations_read_the_way_a_person_reads_them(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_the_timer_reports_once_after_its_measured_steps() -> None:
    reports: list[float] = []
    timer = StepTimer(torch.device("cpu"), reports.append)
    for _ in range(StepTimer.WARMUP + StepTimer.MEASURED - 1):
        timer.step_done()
    assert reports == []
    for _ in range(20):
        timer.step_done()
    assert len(reports) == 1 and reports[0] >= 0
