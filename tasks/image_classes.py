"""The type every few-shot data set loader returns: one split's images and class labels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

SPLITS = ("train", "validation", "test")


class ImageClasses(Dataset):
    """uint8 images [n, C, H, W] (a tensor, or a sequence of them decoded on access) with integer labels; items
    are float images in [0, 1]. `rotate_classes`: episodes rotate each class by a random multiple of 90 degrees
    (Omniglot's meta-train class augmentation)."""

    def __init__(self, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                 rotate_classes: bool = False) -> None:
        self.images, self.labels = images, labels.tolist()
        self.rotate_classes = rotate_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), self.labels[index]

    def class_sizes(self) -> list[int]:
        """The number of examples of each class."""
        return list(Counter(self.labels).values())
