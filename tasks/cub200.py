"""CUB-200-2011 for cross-domain meta-testing, from the official `CUB_200_2011/images/<class>/<image>.jpg` folders.

The class split (140 / 30 / 30 species) and the list of images that also appear in ImageNet (left out, so a model
meta-trained on mini- or tieredImageNet never meta-tests on an image it saw) are learn2learn's (`CUBirds200`,
after Triantafillou et al.'s Meta-Dataset). Images are resized to 84 x 84, mini-ImageNet's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from engine.errors import DataError
from tasks.data_files import ROOT_HINT, corrupt
from tasks.image_classes import ImageClasses
from tasks.learn2learn_import import import_learn2learn

FOLDER = "CUB_200_2011"
IMAGE_SIZE = 84


def _read_image(path: Path) -> Tensor:
    try:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise corrupt(path, f"not a readable image: {exc}") from None
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_cub200(root: Path) -> dict[str, ImageClasses]:
    """The 'train', 'validation' and 'test' species splits (uint8 images [n, 3, 84, 84])."""
    import_learn2learn()
    from learn2learn.vision.datasets.cu_birds200 import IMAGENET_DUPLICATES, SPLITS

    images_dir = root / FOLDER / "images"
    missing = [name for names in SPLITS.values() for name in names if not (images_dir / name).is_dir()]
    if missing:
        raise DataError(f"CUB-200-2011: {len(missing)} species folders (e.g. {missing[0]}) are missing in "
                        f"{images_dir}. Unpack the official CUB_200_2011.tgz there, or {ROOT_HINT}.")
    splits = {}
    for split, classes in SPLITS.items():
        left_out = set(IMAGENET_DUPLICATES[split])
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((images_dir / name).iterdir()):
                if path.name not in left_out:
                    images.append(_read_image(path))
                    labels.append(label)
        splits[split] = ImageClasses(torch.stack(images), torch.tensor(labels))
    return splits
