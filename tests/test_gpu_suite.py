"""bench/gpu_suite.py: the whole suite runs on the CPU with tiny shapes, so that it cannot rot before a GPU comes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_measures_every_part_and_writes_its_json(tmp_path, capsys) -> None:
    suite = load_suite()
    assert suite.main(["--dry-run", "--out", str(tmp_path / "suite.json")]) == 0
    report = json.loads((tmp_path / "suite.json").read_text())
    k = suite.recommended_update_every()
    rows = {r["row"] for r in report["steps"]}
    for option in ("fp32", "bf16", "channels-last", "bf16 + channels-last"):
        assert {f"CE, {option}", f"AdaLFL k=1, {option}", f"AdaLFL k={k}, {option}"} <= rows
    assert "CE, torch.compile" in rows and all(r["ms_per_step"] > 0 for r in report["steps"])
    names = [r["meta-iteration"] for r in report["meta_iterations"]]
    assert len(names) == 2 * 3 * 2 * 2 and "npbml, resnet12, meta-batch 2, vmap" in names
    errors = {r["autocast"]: r["relative error vs float64 CPU"] for r in report["meta_gradient"]}
    assert errors["fp32"] < 1e-4 and errors["bf16"] < 0.1
    assert [p["hours"] > 0 for p in report["projections"]] == [True] * len(report["projections"])
    assert "total wall time" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the suite would run")
def test_without_a_gpu_and_without_dry_run_it_stops_with_one_message(tmp_path, capsys) -> None:
    assert load_suite().main(["--out", str(tmp_path / "suite.json")]) == 2
    assert "none is visible here" in capsys.readouterr().err and not (tmp_path / "suite.json").exists()
