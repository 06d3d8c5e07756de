"""CIFAR-FS and FC-100: few-shot class splits of CIFAR-100, read from the official `cifar-100-python` files.

Both use all 600 images of each class (the official `train` and `test` files together) at CIFAR's 32 x 32.
- CIFAR-FS (Bertinetto et al., 2019): 64 / 16 / 20 classes, named one per line in the split files
  `<data root>/cifar-fs-splits/{train,val,test}.txt` (fine class names as in CIFAR-100's `meta` file).
- FC-100 (Oreshkin et al., 2018): split by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20 classes), the split
  of the paper's supplementary material and its code (TADAM).
Labels number a split's classes in CIFAR-100's fine-label order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.errors import DataError
from tasks.data_files import corrupt, require_files
from tasks.image_classes import ImageClasses
from tasks.image_datasets import unpickle_cifar

FOLDER, SPLIT_FOLDER = "cifar-100-python", "cifar-fs-splits"
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
FC100_SUPERCLASSES = {"train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19), "validation": (8, 11, 13, 16),
                      "test": (0, 7, 12, 14)}


def read_cifar100_classes(root: Path) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """All 60,000 CIFAR-100 images (uint8 [n, 3, 32, 32]), their fine and coarse labels, the fine class names."""
    folder = root / FOLDER
    train, test, meta = require_files(folder, ["train", "test", "meta"], "CIFAR-100",
                                      source="cifar-100-python.tar.gz, unpacked")
    images, fine, coarse = [], [], []
    for path in (train, test):
        batch = unpickle_cifar(path)
        if not {"data", "fine_labels", "coarse_labels"} <= batch.keys():
            raise corrupt(path, "expected the keys 'data', 'fine_labels' and 'coarse_labels'")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise corrupt(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        fine.append(torch.as_tensor(np.asarray(batch["fine_labels"], dtype=np.int64)))
        coarse.append(torch.as_tensor(np.asarray(batch["coarse_labels"], dtype=np.int64)))
    names = unpickle_cifar(meta).get("fine_label_names")
    if names is None or len(names) != 100:
        raise corrupt(meta, "expected 'fine_label_names' with the 100 class names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return torch.cat(images), torch.cat(fine), torch.cat(coarse), names


def _select(images: Tensor, fine: Tensor, classes: list[int]) -> ImageClasses:
    """The images of `classes` (fine labels), relabelled 0..len(classes)-1 in fine-label order."""
    classes = sorted(classes)
    keep = torch.isin(fine, torch.tensor(classes))
    relabel = torch.full((100,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return ImageClasses(images[keep], relabel[fine[keep]])


def load_cifarfs(root: Path) -> dict[str, ImageClasses]:
    """CIFAR-FS's 'train', 'validation' and 'test' splits."""
    images, fine, _, names = read_cifar100_classes(root)
    paths = require_files(root / SPLIT_FOLDER, list(SPLIT_FILES.values()), "CIFAR-FS split lists",
                          source="train.txt, val.txt, test.txt of Bertinetto et al.")
    splits = {}
    for split, path in zip(SPLIT_FILES, paths, strict=True):
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise DataError(f"{path} names classes CIFAR-100 does not have: {', '.join(unknown[:5])}; it must list "
                            "CIFAR-100 fine class names (e.g. aquarium_fish), one per line")
        splits[split] = _select(images, fine, [names.index(name) for name in wanted])
    return splits


def load_fc100(root: Path) -> dict[str, ImageClasses]:
    """FC-100's 'train', 'validation' and 'test' splits."""
    images, fine, coarse, _ = read_cifar100_classes(root)
    splits = {}
    for split, superclasses in FC100_SUPERCLASSES.items():
        classes = torch.unique(fine[torch.isin(coarse, torch.tensor(superclasses))]).tolist()
        splits[split] = _select(images, fine, classes)
    return splits
