"""Validation-based model selection: the evaluation a practitioner would keep, read off a run's history."""

from __future__ import annotations

from typing import Any

MIN_EVALUATIONS_TO_SELECT = 4  # fewer evaluations than this make a poor choice of checkpoint


def best_validation(history: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The evaluation of `history` with the lowest validation `metric` (error or mse); ties go to the earlier."""
    key = f"val_{metric}"
    return min(history, key=lambda record: record[key])  # min keeps the first of equal values


def selection_summary(history: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """results.json's validation-selected fields: the step of the best validation evaluation, its validation and
    test metric, and how many evaluations it was chosen from."""
    best = best_validation(history, metric)
    return {"best_val_step": best["step"], f"best_val_{metric}": best[f"val_{metric}"],
            f"test_{metric}_at_best_val": best[f"test_{metric}"], "evaluations": len(history)}
