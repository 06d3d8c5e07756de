"""Backbone pre-training: it learns, it resumes exactly, and meta-training starts from its blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from engine.config import build_config
from engine.run_dir import RunDir
from npbml.config import EpisodicConfig
from npbml.pretrain import pretrain_backbone
from tasks.image_classes import ImageClasses


def synthetic_classes(classes: int = 5, per_class: int = 20) -> ImageClasses:
    """Noisy copies of one random 28x28 image per class."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randint(0, 256, (classes, 1, 28, 28), generator=g)
    noise = torch.randint(-30, 31, (classes * per_class, 1, 28, 28), generator=g)
    images = (prototypes.repeat_interleave(per_class, 0) + noise).clamp(0, 255).to(torch.uint8)
    return ImageClasses(images, torch.arange(classes).repeat_interleave(per_class))


def config(steps: int) -> EpisodicConfig:
    return build_config(EpisodicConfig, {"method": "maml", "model": {"filters": 8},
                                         "pretrain": {"steps": steps, "batch_size": 32, "lr": 0.05},
                                         "log": {"every": 5, "checkpoint_every": 5}})


class StopAfterReads:
    def __init__(self, reads: int) -> None:
        self.reads = reads

    @property
    def requested(self) -> bool:
        self.reads -= 1
        return self.reads == 0


class NeverStop:
    requested = False


def test_pretraining_learns_the_meta_training_classes(tmp_path) -> None:
    data = synthetic_classes()
    blocks = pretrain_backbone(config(30), data, (1, 28, 28), torch.device("cpu"), RunDir(tmp_path), NeverStop())
    assert blocks and all(name.startswith("blocks.") for name in blocks)
    state = torch.load(tmp_path / "pretrain.pt", weights_only=False)
    assert state["step"] == 30
    from tasks.models import build_model

    model = build_model("conv4", (1, 28, 28), 5, filters=8)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(len(data))])
        accuracy = (model(x).argmax(1) == torch.tensor(data.labels)).float().mean()
    assert accuracy > 0.9


def test_interrupted_pretraining_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    data, device = synthetic_classes(), torch.device("cpu")
    whole = pretrain_backbone(config(12), data, (1, 28, 28), device, RunDir(tmp_path / "whole"), NeverStop())
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(config(12), data, (1, 28, 28), device, RunDir(tmp_path / "split"), StopAfterReads(7))
    assert torch.load(tmp_path / "split" / "pretrain.pt", weights_only=False)["step"] == 7
    split = pretrain_backbone(config(12), data, (1, 28, 28), device, RunDir(tmp_path / "split"), NeverStop())
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["maml_omniglot_5w1s.yaml", "npbml_omniglot_5w1s.yaml"])
def test_meta_training_starts_from_the_pretrained_blocks(tmp_path, shared_data, config_file) -> None:
    tiny = ["model.filters=8", "data.query=2", "inner.steps=1", "outer.iterations=1", "outer.meta_batch=1",
            "eval.every=1", "eval.val_tasks=2", "eval.test_tasks=2", "log.every=2", "log.checkpoint_every=3",
            "log.progress=false", "threads=1", "outer.lr=1e-12"]
    for name, steps in (("plain", 0), ("pretrained", 6)):
        overrides = [a for v in (*tiny, f"name={name}", f"pretrain.steps={steps}", "pretrain.batch_size=16")
                     for a in ("--set", v)]
        assert train.main(["--config", f"configs/{config_file}", "--runs-root", str(tmp_path), "--data-root",
                           str(shared_data), *overrides]) == 0
    pretrained = torch.load(tmp_path / "pretrained" / "pretrain.pt", weights_only=False)
    assert pretrained["step"] == 6
    learners = {n: torch.load(tmp_path / n / "checkpoint.pt", weights_only=False)["learner"]
                for n in ("plain", "pretrained")}
    key = next(k for k in learners["pretrained"] if k.endswith("blocks.0.unit.conv.weight"))
    # one meta-step at a negligible outer lr: the meta-learner's first block is the pre-trained one
    torch.testing.assert_close(learners["pretrained"][key], pretrained["model"]["blocks.0.unit.conv.weight"])
    assert not torch.allclose(learners["plain"][key], learners["pretrained"][key])
    assert (Path(tmp_path) / "pretrained" / "pretrain").is_dir()
