"""npbml.term_ablation: a trained NPBML run meta-tested with learned-loss terms left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_episodic_train import run

from npbml import term_ablation


@pytest.mark.slow
def test_the_ablation_meta_tests_the_runs_own_tasks_with_each_term_left_out(shared_data: Path, tmp_path: Path,
                                                                             capsys) -> None:
    code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "r", "components.reset_head=true")
    assert code == 0
    assert term_ablation.main([str(folder), "--tasks", "3", "--data-root", str(shared_data)]) == 0
    report = json.loads((folder / "term_ablation.json").read_text())
    assert report["tasks"] == 3 and list(report["variants"]) == ["full", "ce only", "without L_S", "without L_Q",
                                                            "without R"]
    results = json.loads((folder / "results.json").read_text())  # its meta-test: the same 3 tasks, the full loss
    assert report["variants"]["full"]["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert "| without R |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        term_ablation.main([str(folder), "--tasks", "0"])
    assert "at least 1 task" in capsys.readouterr().err


def test_the_variants_follow_the_terms_the_run_has() -> None:
    assert term_ablation.variants(["query"]) == {"full": (), "ce only": ("query",), "without L_Q": ("query",)}


@pytest.mark.slow
def test_a_run_with_some_learned_terms_trains_logs_and_is_ablated(shared_data: Path, tmp_path: Path) -> None:
    code, folder = run("npbml_omniglot_5w1s.yaml", tmp_path, shared_data, "q", "components.loss_terms=[query]")
    assert code == 0
    assert term_ablation.main([str(folder), "--tasks", "2", "--data-root", str(shared_data)]) == 0
    report = json.loads((folder / "term_ablation.json").read_text())
    assert list(report["variants"]) == ["full", "ce only", "without L_Q"]


@pytest.mark.slow
def test_a_run_without_the_learned_loss_is_refused_with_the_reason(shared_data: Path, tmp_path: Path,
                                                                   capsys) -> None:
    code, folder = run("maml_omniglot_5w1s.yaml", tmp_path, shared_data, "m")
    assert code == 0
    assert term_ablation.main([str(folder), "--data-root", str(shared_data)]) == 2
    assert "not an NPBML run with the learned loss" in capsys.readouterr().err
    assert term_ablation.main([str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
