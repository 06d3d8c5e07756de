"""Backbone pre-training as the reference's `run_pretraining.py` does it: the backbone's blocks and a temporary head
over every meta-training class, trained as an ordinary classifier on the meta-training split, keeping the blocks
whose prototype accuracy on meta-validation tasks is best; meta-training then starts from those blocks.

The reference's NPBML runs start this way (`pretrained_backbone: True`; 200,000 steps at batch 128); its inner
learning rate of 0.01 presumes it. Checkpointed to `<run>/pretrain.pt` (the best blocks with it) every
`log.checkpoint_every` steps and at the end, resumed from there, stopped at a step boundary on Ctrl-C / SIGTERM like
meta-training; under torchrun each rank takes its share of every batch and of the validation tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.checkpoint import save_checkpoint
from engine.distributed import EventWriter, all_reduce_mean_, all_reduce_sum_, barrier, check_divisible, shard, world
from engine.rng import step_generator
from engine.run_dir import RunDir
from engine.run_loop import StepBoundary, Stop, restore
from npbml.config import EpisodicConfig, PretrainConfig
from tasks.augment import reference_pretraining_augment
from tasks.backbones import Backbone
from tasks.episodes import Episode, EpisodeSampler
from tasks.image_classes import ImageClasses
from tasks.models import build_model

PRETRAIN_STREAM = 3  # batches and augmentation draws; the validation tasks' seed is seed * 10 + this

# run_pretraining.py's optimizer, learning rate and x0.1 milestones, by backbone
REFERENCE_RECIPES: dict[str, tuple[str, float, list[int]]] = {
    "conv4": ("adam", 1e-3, [200_000]),
    "resnet12": ("sgd", 0.1, [80_000, 100_000, 110_000, 120_000]),
}


def backbone_of(learner: nn.Module) -> Backbone:
    """The backbone inside a meta-learner (NPBML's own, or the module learn2learn's MAML / Meta-SGD wraps)."""
    return learner.backbone if hasattr(learner, "backbone") else learner.algorithm.module


def recipe(cfg: PretrainConfig, backbone: str) -> tuple[str, float, list[int]]:
    """(optimizer, lr, milestones): the config's, each unset one the reference's for `backbone`."""
    optimizer, lr, milestones = REFERENCE_RECIPES[backbone]
    return (cfg.optimizer or optimizer, lr if cfg.lr is None else cfg.lr,
            milestones if cfg.milestones is None else cfg.milestones)


def build_optimizer(cfg: PretrainConfig, backbone: str, model: nn.Module
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    name, lr, milestones = recipe(cfg, backbone)
    if name == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)


def _batch(data: ImageClasses, labels: torch.Tensor, cfg: PretrainConfig, seed: int, step: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step`, distinct examples drawn uniformly (a pure function of seed and step), this rank's share of it;
    RGB images augmented as the reference does when `cfg.augment`."""
    generator = step_generator(seed, step, PRETRAIN_STREAM)
    indices = shard(torch.randperm(len(labels), generator=generator)[:cfg.batch_size]).tolist()
    images = torch.stack([data[i][0] for i in indices])
    if cfg.augment and images.shape[1] == 3:
        images = reference_pretraining_augment(images, int(torch.randint(2**62, (1,), generator=generator)))
    return images.to(device), labels[indices].to(device)


@torch.no_grad()
def prototype_accuracy(model: Backbone, episodes: Iterable[Episode], device: torch.device) -> torch.Tensor:
    """The summed query accuracy of `episodes` when each query example takes the class of the nearest support
    prototype (mean embedding, squared Euclidean distance), the reference's pre-training validation; support and
    query sets go through the model separately, batch norm on each one's statistics as there."""
    total = torch.zeros((), device=device)
    for episode in episodes:
        episode = episode.to(device)
        _, support = model(episode.support_x, with_embedding=True)
        _, query = model(episode.query_x, with_embedding=True)
        ways = int(episode.support_y.max()) + 1
        prototypes = torch.zeros(ways, support.shape[1], device=device).index_add_(0, episode.support_y, support)
        prototypes /= torch.bincount(episode.support_y, minlength=ways).unsqueeze(1)
        distances = ((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(dim=2)
        total += (distances.argmin(dim=1) == episode.query_y).float().mean()
    return total


def pretrain_backbone(config: EpisodicConfig, data: ImageClasses, validation: EpisodeSampler,
                      in_shape: tuple[int, int, int], device: torch.device, run: RunDir, stop: Stop
                      ) -> dict[str, torch.Tensor]:
    """Pre-train (or finish pre-training) the backbone on `data`, the meta-training split; returns the parameters
    (`blocks.*`) of the blocks with the best prototype accuracy on `pretrain.val_tasks` fixed tasks of
    `validation`, measured every `pretrain.validate_every` steps and at the last, to load into the meta-learner."""
    cfg, ranks = config.pretrain, world()
    check_divisible(cfg.batch_size, "examples per pre-training batch", "pretrain.batch_size")
    labels = torch.tensor(data.labels)
    torch.manual_seed(config.seed)
    model = build_model(config.model.backbone, in_shape, int(labels.max()) + 1, filters=config.model.filters).to(device)
    optimizer, scheduler = build_optimizer(cfg, config.model.backbone, model)
    path, step, best = run.path / "pretrain.pt", 0, {"accuracy": -1.0, "step": 0, "blocks": {}}
    if path.is_file():
        def load(state: dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best.update(state["best"])

        step = restore(path, load)["step"]

    def save() -> None:
        if ranks.is_main:
            save_checkpoint(path, {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "best": best})

    def validate() -> float:
        episodes = validation.fixed(cfg.val_tasks, seed=config.seed * 10 + PRETRAIN_STREAM, first=ranks.rank,
                                    stride=ranks.size)
        total = prototype_accuracy(model, episodes, device)
        all_reduce_sum_([total])
        return total.item() / cfg.val_tasks

    writer = EventWriter(run.events / "pretrain", purge_step=step + 1)
    boundary = StepBoundary(stop, save, config.log.checkpoint_every, cfg.steps)
    try:
        while step < cfg.steps:
            images, targets = _batch(data, labels, cfg, config.seed, step, device)
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_mean_([p.grad for p in model.parameters() if p.grad is not None])
            optimizer.step()
            scheduler.step()
            step += 1
            if step % config.log.every == 0 or step == cfg.steps:
                accuracy = (logits.argmax(dim=1) == targets).float().mean()
                loss_value, accuracy_value = torch.stack([loss.detach(), accuracy]).tolist()
                writer.add_scalar("pretrain/loss", loss_value, step)
                writer.add_scalar("pretrain/accuracy", accuracy_value, step)
            if step % cfg.validate_every == 0 or step == cfg.steps:
                accuracy_value = validate()
                if accuracy_value > best["accuracy"]:
                    best = {"accuracy": accuracy_value, "step": step,
                            "blocks": {n: v.detach().clone() for n, v in model.state_dict().items()
                                       if n.startswith("blocks.")}}
                writer.add_scalar("pretrain/val_prototype_accuracy", accuracy_value, step)
                writer.add_scalar("pretrain/best_val_prototype_accuracy", best["accuracy"], step)
            boundary(step)
    finally:
        writer.close()
    barrier()
    if ranks.is_main:
        tqdm.write(f"pre-training: {cfg.steps} steps; the blocks of step {best['step']} are kept, prototype accuracy "
                   f"{100 * best['accuracy']:.2f} % on {cfg.val_tasks} validation tasks")
    return best["blocks"]
