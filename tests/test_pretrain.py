"""Backbone pre-training: the reference's recipe and validation, it learns, keeps the best blocks, resumes exactly,
and meta-training starts from its blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import npbml.pretrain
import train
from engine.config import build_config
from engine.run_dir import RunDir
from npbml.config import EpisodicConfig
from npbml.pretrain import build_optimizer, pretrain_backbone, prototype_accuracy
from tasks.augment import reference_pretraining_augment
from tasks.episodes import Episode, EpisodeSampler
from tasks.image_classes import ImageClasses


def synthetic_classes(classes: int = 5, per_class: int = 20) -> ImageClasses:
    """Noisy copies of one random 28x28 image per class."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randint(0, 256, (classes, 1, 28, 28), generator=g)
    noise = torch.randint(-30, 31, (classes * per_class, 1, 28, 28), generator=g)
    images = (prototypes.repeat_interleave(per_class, 0) + noise).clamp(0, 255).to(torch.uint8)
    return ImageClasses(images, torch.arange(classes).repeat_interleave(per_class))


def config(steps: int, **pretrain) -> EpisodicConfig:
    settings = {"steps": steps, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "validate_every": 5,
                "val_tasks": 4, **pretrain}
    return build_config(EpisodicConfig, {"method": "maml", "model": {"filters": 8}, "pretrain": settings,
                                         "log": {"every": 5, "checkpoint_every": 5}})


def pretrain(cfg: EpisodicConfig, run: Path, stop=None, data: ImageClasses | None = None) -> dict[str, torch.Tensor]:
    data = data or synthetic_classes()
    validation = EpisodeSampler(data, ways=5, shots=1, query=2)
    return pretrain_backbone(cfg, data, validation, tuple(data[0][0].shape), torch.device("cpu"), RunDir(run),
                             stop or NeverStop())


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
    blocks = pretrain(config(30), tmp_path, data=data)
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
    whole = pretrain(config(12), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(12), tmp_path / "split", StopAfterReads(7))
    assert torch.load(tmp_path / "split" / "pretrain.pt", weights_only=False)["step"] == 7
    split = pretrain(config(12), tmp_path / "split")
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=0, atol=0, msg=name)


def test_the_references_optimizer_and_milestones_by_backbone() -> None:
    model = torch.nn.Linear(2, 2)
    reference = {"optimizer": None, "lr": None}
    adam, adam_schedule = build_optimizer(config(1, **reference).pretrain, "conv4", model)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == 1e-3 and adam.defaults["weight_decay"] == 5e-4
    assert dict(adam_schedule.milestones) == {200_000: 1}
    sgd, sgd_schedule = build_optimizer(config(1, **reference).pretrain, "resnet12", model)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.1, 0.9, True)
    assert sgd.defaults["weight_decay"] == 5e-4 and sgd_schedule.gamma == 0.1
    assert sorted(sgd_schedule.milestones) == [80_000, 100_000, 110_000, 120_000]
    chosen, chosen_schedule = build_optimizer(config(1, optimizer="sgd", lr=0.3, milestones=[7]).pretrain, "conv4",
                                              model)
    assert isinstance(chosen, torch.optim.SGD) and chosen.defaults["lr"] == 0.3
    assert dict(chosen_schedule.milestones) == {7: 1}


class Flatten(torch.nn.Module):
    """A 'backbone' whose embedding is its input, flattened."""

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        return x, x.flatten(1)


def test_prototype_accuracy_by_hand() -> None:
    # support: class 0 at (0, 0) and (2, 0) -> prototype (1, 0); class 1 at (0, 4) -> prototype (0, 4)
    support_x, support_y = torch.tensor([[0.0, 0.0], [0.0, 4.0], [2.0, 0.0]]), torch.tensor([0, 1, 0])
    # (1, 1.9): distances 3.61 and 5.41 -> class 0 (right); (0, 2.6): 7.76 and 1.96 -> class 1 (right);
    # (3, 3): 13 and 10 -> class 1 (labelled 0: wrong)
    query_x, query_y = torch.tensor([[1.0, 1.9], [0.0, 2.6], [3.0, 3.0]]), torch.tensor([0, 1, 0])
    episode = Episode(support_x, support_y, query_x, query_y)
    total = prototype_accuracy(Flatten(), [episode, episode], torch.device("cpu"))
    torch.testing.assert_close(total, torch.tensor(2 * 2 / 3))


def test_the_blocks_of_the_best_validation_are_kept(tmp_path, monkeypatch) -> None:
    """Validation at steps 5 and 10 (and the last, 12): the best accuracy (at 5) names the blocks returned."""
    scores = iter([0.9, 0.5, 0.7])
    monkeypatch.setattr(npbml.pretrain, "prototype_accuracy", lambda *args: torch.tensor(4 * next(scores)))
    kept = pretrain(config(12), tmp_path / "long")
    assert next(scores, None) is None  # three validations
    state = torch.load(tmp_path / "long" / "pretrain.pt", weights_only=False)
    assert state["best"]["step"] == 5 and state["best"]["accuracy"] == pytest.approx(0.9)
    monkeypatch.setattr(npbml.pretrain, "prototype_accuracy", lambda *args: torch.tensor(1.0))
    at_step_5 = pretrain(config(5), tmp_path / "short")
    assert kept.keys() == at_step_5.keys()
    for name, value in kept.items():
        torch.testing.assert_close(value, at_step_5[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(value, state["model"][name]) for name, value in kept.items())


def test_rgb_augmentation_replays_and_stays_in_range() -> None:
    images = torch.rand(6, 3, 16, 16)
    once = reference_pretraining_augment(images, seed=5)
    assert once.shape == images.shape and 0 <= once.min() and once.max() <= 1
    torch.testing.assert_close(reference_pretraining_augment(images, seed=5), once, rtol=0, atol=0)
    assert not torch.equal(reference_pretraining_augment(images, seed=6), once)
    assert not torch.equal(once, images)


@pytest.mark.parametrize("channels, augmented", [(1, 0), (3, 2)])
def test_only_rgb_batches_are_augmented(tmp_path, monkeypatch, channels, augmented) -> None:
    calls = []

    def counted(images, seed):
        calls.append(seed)
        return reference_pretraining_augment(images, seed)

    monkeypatch.setattr(npbml.pretrain, "reference_pretraining_augment", counted)
    gray = synthetic_classes()
    data = ImageClasses(gray.images.repeat(1, channels, 1, 1), torch.tensor(gray.labels))
    pretrain(config(2), tmp_path, data=data)
    assert len(calls) == augmented and len(set(calls)) == augmented


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["maml_omniglot_5w1s.yaml", "npbml_omniglot_5w1s.yaml"])
def test_meta_training_starts_from_the_pretrained_blocks(tmp_path, shared_data, config_file) -> None:
    tiny = ["model.filters=8", "data.query=2", "inner.steps=1", "outer.iterations=1", "outer.meta_batch=1",
            "eval.every=1", "eval.val_tasks=2", "eval.test_tasks=2", "log.every=2", "log.checkpoint_every=3",
            "log.progress=false", "threads=1", "outer.lr=1e-12"]
    for name, steps in (("plain", 0), ("pretrained", 6)):
        overrides = [a for v in (*tiny, f"name={name}", f"pretrain.steps={steps}", "pretrain.batch_size=16",
                                                "pretrain.val_tasks=2")
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
