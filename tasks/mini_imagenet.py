"""mini-ImageNet from the official `mini-imagenet-cache-{train,validation,test}.pkl` files.

Each pickle (the format learn2learn's `MiniImagenet` reads) is a dict with `image_data`, a uint8
array [n, 84, 84, 3], and `class_dict`, mapping each class name to the list of its row indices.
The three files (64 / 16 / 20 classes, 600 images each) go in `<data root>/mini-imagenet/`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from engine.errors import DataError
from tasks.image_classes import SPLITS, ImageClasses

FOLDER = "mini-imagenet"


def pickle_path(root: Path, split: str) -> Path:
    return root / FOLDER / f"mini-imagenet-cache-{split}.pkl"


def load_mini_imagenet_splits(root: Path) -> dict[str, ImageClasses]:
    """The 'train', 'validation' and 'test' splits of the three pickles."""
    return {split: ImageClasses(*load_mini_imagenet(root, split)) for split in SPLITS}


def load_mini_imagenet(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [n, 3, 84, 84], labels [n]) of one split; labels number its classes by sorted name."""
    path = pickle_path(root, split)
    if not path.is_file():
        raise DataError(
            f"mini-ImageNet file {path} not found; put mini-imagenet-cache-{{train,validation,test}}.pkl "
            f"in {root / FOLDER} or point --data-root at the folder that holds {FOLDER}/"
        )
    try:
        with path.open("rb") as f:
            content = pickle.load(f)
        images = np.asarray(content["image_data"], dtype=np.uint8)
        class_dict = content["class_dict"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a mini-ImageNet cache pickle ({type(exc).__name__}: {exc})") from None
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: image_data has shape {images.shape}, expected [n, 84, 84, 3]")
    labels = np.full(len(images), -1, dtype=np.int64)
    for label, name in enumerate(sorted(class_dict)):
        labels[np.asarray(class_dict[name], dtype=np.int64)] = label
    if (labels < 0).any():
        raise DataError(f"{path}: {int((labels < 0).sum())} images belong to no class in class_dict")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
