"""tieredImageNet from the official pickles of Ren et al. (2018), the files learn2learn's `TieredImagenet` reads.

`<data root>/tiered-imagenet/{train,val,test}_images_png.pkl` holds a list of PNG-encoded 84 x 84 RGB images and
`{train,val,test}_labels.pkl` a dict whose `label_specific` gives each image's class (351 / 97 / 160 classes).
Images stay encoded in memory and are decoded when an episode draws them: the decoded train split alone would
take about 10 GB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.data_files import corrupt, require_files
from tasks.image_classes import SPLITS, ImageClasses
from tasks.image_datasets import unpickle_arrays

FOLDER = "tiered-imagenet"
FILE_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class EncodedImages(Sequence):
    """PNG- or JPEG-encoded images, decoded on access to uint8 tensors [3, H, W]."""

    def __init__(self, encoded: Sequence[bytes]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(io.BytesIO(bytes(self.encoded[index]))) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_tiered_imagenet(root: Path) -> dict[str, ImageClasses]:
    """The 'train', 'validation' and 'test' splits, each over its encoded images."""
    return {split: load_split(root, split) for split in SPLITS}


def load_split(root: Path, split: str) -> ImageClasses:
    """One split ('train', 'validation' or 'test') as ImageClasses over the encoded images."""
    name = FILE_SPLITS[split]
    images_path, labels_path = require_files(root / FOLDER, [f"{name}_images_png.pkl", f"{name}_labels.pkl"],
                                             "tieredImageNet", source="Ren et al.'s tiered-imagenet pickles")
    encoded = unpickle_arrays(images_path)
    labels = unpickle_arrays(labels_path)
    if not isinstance(encoded, (list, np.ndarray)):
        raise corrupt(images_path, "expected a list of encoded PNG images")
    if not isinstance(labels, dict):
        raise corrupt(labels_path, "expected a dict with 'label_specific'")
    labels = {k.decode() if isinstance(k, bytes) else k: v for k, v in labels.items()}
    if "label_specific" not in labels or len(labels["label_specific"]) != len(encoded):
        raise corrupt(labels_path, f"expected 'label_specific' with one label per image ({len(encoded)})")
    specific = torch.as_tensor(np.asarray(labels["label_specific"], dtype=np.int64))
    _, dense = torch.unique(specific, return_inverse=True)  # classes numbered 0..n-1 within the split
    return ImageClasses(EncodedImages(encoded), dense)
