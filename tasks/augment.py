"""Training-time image augmentation, vectorised over a batch and driven by an explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
