"""Validation-based selection over a run's evaluations."""

from __future__ import annotations

from engine.selection import best_validation, selection_summary

HISTORY = [
    {"step": 10, "val_error": 0.30, "test_error": 0.31},
    {"step": 20, "val_error": 0.20, "test_error": 0.22},
    {"step": 30, "val_error": 0.20, "test_error": 0.19},  # ties with step 20: the earlier is kept
    {"step": 40, "val_error": 0.25, "test_error": 0.26},
]


def test_the_best_validation_evaluation_is_kept_and_ties_go_to_the_earlier() -> None:
    assert best_validation(HISTORY, "error")["step"] == 20
    assert selection_summary(HISTORY, "error") == {"best_val_step": 20, "best_val_error": 0.20,
                                                   "test_error_at_best_val": 0.22, "evaluations": 4}
