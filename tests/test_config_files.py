"""Config files: `base:` overlays, its errors, and the shipped episodic configs' names against their contents."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from engine.config import load_yaml
from engine.errors import ConfigError
from engine.experiment import resolve_config
from train import FAMILIES


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_base_is_overlaid_section_by_section_and_chains(tmp_path) -> None:
    write(tmp_path / "root.yaml", "method: npbml\ndata:\n  ways: 5\n  shots: 1\ninner:\n  lr: 0.1\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\ndata:\n  shots: 5\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\ninner: {lr: 0.4}\nseed: 3\n")
    assert load_yaml(leaf) == {"method": "npbml", "data": {"ways": 5, "shots": 5}, "inner": {"lr": 0.4}, "seed": 3}


@pytest.mark.parametrize("files, fragment", [
    ({"a.yaml": "base: a.yaml\n"}, "base a.yaml leads back to itself"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "leads back to itself"),
    ({"a.yaml": "base: missing.yaml\n"}, "missing.yaml does not exist; base is read relative to the file"),
    ({"a.yaml": "base: [b.yaml]\n"}, "base must be the path of another YAML file"),
])
def test_a_bad_base_is_one_clear_error(tmp_path, files, fragment) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_yaml(tmp_path / "a.yaml")


DATASETS = {"omniglot": "omniglot", "miniimagenet": "mini_imagenet", "cifarfs": "cifarfs", "fc100": "fc100",
            "tieredimagenet": "tieredimagenet"}
EPISODIC = re.compile(r"(npbml|maml|metasgd)_([a-z0-9]+)_(\d+)w(\d+)s(?:_(conv4|resnet12))?(?:_cpu)?\.yaml")
NAMED = sorted(p.name for p in Path("configs").glob("*.yaml") if EPISODIC.fullmatch(p.name))


def test_every_data_set_has_both_shots_and_both_backbones() -> None:
    combos = {m.group(2, 4, 5) for m in map(EPISODIC.fullmatch, NAMED) if m.group(1) == "npbml"}
    for dataset in DATASETS:
        for shots in ("1", "5"):
            assert {(dataset, shots, "resnet12")} <= combos, (dataset, shots)
            assert combos & {(dataset, shots, "conv4"), (dataset, shots, None)}, (dataset, shots)


@pytest.mark.parametrize("name", NAMED)
def test_an_episodic_config_holds_what_its_name_says(name) -> None:
    method, dataset, ways, shots, backbone = EPISODIC.fullmatch(name).groups()
    config, _ = resolve_config(load_yaml(Path("configs") / name), FAMILIES)
    assert config.method == method and config.data.dataset == DATASETS[dataset]
    assert (config.data.ways, config.data.shots) == (int(ways), int(shots))
    assert config.model.backbone == (backbone or "conv4")


@pytest.mark.parametrize("name", [n for n in NAMED if n.endswith("_cpu.yaml")])
def test_a_cpu_config_differs_from_its_paper_config_only_in_budget(name) -> None:
    """2,000 meta-iterations at meta-batch 4, no pre-training; nothing else differs."""
    cpu, _ = resolve_config(load_yaml(Path("configs") / name), FAMILIES)
    paper, _ = resolve_config(load_yaml(Path("configs") / name.replace("_cpu", "")), FAMILIES)
    assert (cpu.outer.iterations, cpu.outer.meta_batch, cpu.pretrain.steps) == (2000, 4, 0)
    assert dataclasses.replace(cpu, outer=paper.outer, pretrain=paper.pretrain) == paper


@pytest.mark.parametrize("name", [n for n in NAMED if not n.endswith("_cpu.yaml")])
def test_paper_configs_take_the_references_schedule_and_meta_batch(name) -> None:
    """60,000 meta-iterations; meta-batch 32 on Omniglot (its data set config), else 4 for 1-shot and 2 for
    5-shot (the reference's run.sh, both backbones)."""
    config, _ = resolve_config(load_yaml(Path("configs") / name), FAMILIES)
    expected = 32 if config.data.dataset == "omniglot" else {1: 4, 5: 2}[config.data.shots]
    assert (config.outer.iterations, config.outer.meta_batch) == (60000, expected)


@pytest.mark.parametrize("name", [n for n in NAMED if not n.endswith("_cpu.yaml")]
                         + sorted(p.name for p in Path("configs").glob("npbml_ablation_*.yaml")))
def test_paper_configs_pretrain_npbml_as_the_reference_does(name) -> None:
    """NPBML from a backbone pre-trained 200,000 steps at batch 128 (`pretrained_backbone: True`), inner lr 0.01
    (npbml_config) but 0.1 on Omniglot (its data set config); MAML and Meta-SGD from scratch (maml_config)."""
    config, _ = resolve_config(load_yaml(Path("configs") / name), FAMILIES)
    npbml = config.method == "npbml"
    assert (config.pretrain.steps, config.pretrain.batch_size) == ((200_000 if npbml else 0), 128)
    assert (config.pretrain.optimizer, config.pretrain.lr, config.pretrain.milestones) == (None, None, None)
    if npbml:
        assert config.inner.lr == (0.1 if config.data.dataset == "omniglot" else 0.01)
