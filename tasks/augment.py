"""Training-time image augmentation, replayable: driven by an explicit generator or seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


def random_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Each image zero-padded by `padding` pixels, randomly cropped back to its size and, when `flip`,
    mirrored left-right with probability 1/2 (torchvision's RandomCrop(padding) + RandomHorizontalFlip).

    `images` is (B, C, H, W) of any dtype; apply it to raw pixels, before normalisation, so the padding
    is black as in torchvision. Every random number comes from `generator` (on its own device).
    """
    b, c, h, w = images.shape
    device = images.device

    def draw(high: int) -> Tensor:
        return torch.randint(high, (b,), generator=generator, device=generator.device).to(device)

    top, left = draw(2 * padding + 1), draw(2 * padding + 1)
    rows = top[:, None] + torch.arange(h, device=device)
    cols = left[:, None] + torch.arange(w, device=device)
    if flip:
        cols = torch.where(draw(2)[:, None].bool(), cols.flip(1), cols)
    padded = F.pad(images, (padding, padding, padding, padding))
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def reference_pretraining_augment(images: Tensor, seed: int) -> Tensor:
    """The reference's pre-training transforms for RGB sets, each image its own draw: RandomResizedCrop back to
    the images' size, ColorJitter(brightness, contrast, saturation 0.4), RandomHorizontalFlip. `images` (B, 3, H, W)
    float in [0, 1] (before any normalisation, as there). The draws come from torch's generator seeded with `seed`
    inside a fork of its state, so they replay exactly and the global state is untouched."""
    transform = v2.Compose([v2.RandomResizedCrop(tuple(images.shape[-2:]), antialias=True),
                            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), v2.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in images])
