"""bench/gpu_suite.py: the whole suite runs on the CPU with tiny shapes, so that it cannot rot before a GPU comes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import UserError

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
    assert [p["hours"] > 0 for p in report["projections"]] == [True] * 4  # k = 1, k, NPBML task loop and vmap
    assert "total wall time" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the suite would run")
def test_without_a_gpu_and_without_dry_run_it_stops_with_one_message(tmp_path, capsys) -> None:
    assert load_suite().main(["--out", str(tmp_path / "suite.json")]) == 2
    assert "none is visible here" in capsys.readouterr().err and not (tmp_path / "suite.json").exists()


def test_a_row_out_of_memory_is_reported_and_the_others_still_run() -> None:
    suite = load_suite()
    calls = []

    def fits() -> None:
        calls.append(1)

    def too_big() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.02 GiB.")

    def said_so() -> None:  # the vectorised meta-batch's message, raised from the allocator's error
        try:
            too_big()
        except torch.OutOfMemoryError as error:
            raise UserError("out of device memory adapting 32 tasks at once") from error

    def broken() -> None:
        raise UserError("a real problem")

    def fits_once() -> None:  # through its warm-up, then out of memory in the first timed round
        if calls.count("once"):
            too_big()
        calls.append("once")

    timings = suite.measure({"fits": fits, "too big": too_big, "said so": said_so, "fits once": fits_once},
                            torch.device("cpu"), repeats=3, budget_s=60)
    for name in ("too big", "said so", "fits once"):
        assert timings[name] == {"seconds": None, "peak_mb": None, "repeats": 0, "note": "out of memory"}
    assert timings["fits"]["repeats"] == 3 and timings["fits"]["note"] == "" and calls.count(1) == 4
    with pytest.raises(UserError, match="a real problem"):  # any other error still stops the suite
        suite.measure({"broken": broken}, torch.device("cpu"), repeats=1, budget_s=60)
    twice = {**timings["fits"], "seconds": 2 * timings["fits"]["seconds"]}
    steps = suite.step_table("m", {"CE, fp32": timings["fits"], "AdaLFL k=4, fp32": timings["too big"],
                                   "AdaLFL k=1, fp32": twice}, suite.DRY_RUN, 4)
    assert steps[1]["ms_per_step"] is None and "out of memory" in suite.table(steps)
    assert steps[0]["ms_per_step"] == pytest.approx(1000 * timings["fits"]["seconds"] / 4)  # a block of 4 steps
    assert steps[2]["ratio_to_ce_fp32"] == pytest.approx(2.0) and steps[0]["ratio_to_ce_fp32"] == 1.0


def test_every_training_step_row_runs_a_block_of_k_steps_between_synchronisations(monkeypatch) -> None:
    suite = load_suite()
    counted = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: counted.append(1))
    rows = suite.training_steps("lenet5_relu", suite.DRY_RUN, torch.device("cpu"), 4)
    for name, run in rows.items():
        counted.clear()
        run()
        assert len(counted) == 4, name  # CE, AdaLFL k = 1 and k = 4 alike
