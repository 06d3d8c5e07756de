"""Backbone pre-training: the backbone's blocks and a temporary head over every meta-training class, trained as
an ordinary classifier on the meta-training split, before meta-training starts from the blocks.

The reference code's NPBML runs start this way (`pretrained_backbone: True`; 200,000 steps at batch 128); its
inner learning rate of 0.01 presumes it. Checkpointed to `<run>/pretrain.pt` every `log.checkpoint_every` steps
and at the end, resumed from there, stopped at a step boundary on Ctrl-C / SIGTERM like meta-training; under
torchrun each rank takes its share of every batch and the gradients are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import save_checkpoint
from engine.distributed import EventWriter, all_reduce_mean_, barrier, check_divisible, shard, world
from engine.rng import step_generator
from engine.run_dir import RunDir
from engine.run_loop import StepBoundary, Stop, restore
from npbml.config import EpisodicConfig
from tasks.backbones import Backbone
from tasks.image_classes import ImageClasses
from tasks.models import build_model

PRETRAIN_STREAM = 3


def backbone_of(learner: nn.Module) -> Backbone:
    """The backbone inside a meta-learner (NPBML's own, or the module learn2learn's MAML / Meta-SGD wraps)."""
    return learner.backbone if hasattr(learner, "backbone") else learner.algorithm.module


def _batch(data: ImageClasses, labels: torch.Tensor, size: int, seed: int, step: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` (a pure function of seed and step), this rank's share of it."""
    indices = torch.randint(len(labels), (size,), generator=step_generator(seed, step, PRETRAIN_STREAM))
    indices = shard(indices).tolist()
    images = torch.stack([data[i][0] for i in indices])
    return images.to(device), labels[indices].to(device)


def pretrain_backbone(config: EpisodicConfig, data: ImageClasses, in_shape: tuple[int, int, int],
                      device: torch.device, run: RunDir, stop: Stop) -> dict[str, torch.Tensor]:
    """Pre-train (or finish pre-training) the backbone on `data`, the meta-training split; returns its blocks'
    parameters (`blocks.*`), to load into the meta-learner's backbone."""
    cfg = config.pretrain
    check_divisible(cfg.batch_size, "examples per pre-training batch", "pretrain.batch_size")
    labels = torch.tensor(data.labels)
    torch.manual_seed(config.seed)
    model = build_model(config.model.backbone, in_shape, int(labels.max()) + 1, filters=config.model.filters).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    path, step = run.path / "pretrain.pt", 0
    if path.is_file():
        def load(state: dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])

        step = restore(path, load)["step"]

    def save() -> None:
        if world().is_main:
            save_checkpoint(path, {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict()})

    writer = EventWriter(run.events / "pretrain", purge_step=step + 1)
    boundary = StepBoundary(stop, save, config.log.checkpoint_every, cfg.steps)
    try:
        while step < cfg.steps:
            images, targets = _batch(data, labels, cfg.batch_size, config.seed, step, device)
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
            boundary(step)
    finally:
        writer.close()
    barrier()
    return {name: value for name, value in model.state_dict().items() if name.startswith("blocks.")}
