"""Omniglot decoded once into memory: 1623 characters x 20 drawings, 28x28, as in learn2learn's benchmark.

The PNG tree (`omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png`) is decoded
with learn2learn's benchmark transform (Resize(28, LANCZOS), ToTensor, 1 - x) into one uint8 tensor
and cached under the project's `.cache/` folder, keyed by a hash of every file's name, size and
modification time (so a replaced image is decoded again); the data folder is only ever read.
Episodes then index that tensor and never touch PIL or the disk.

Split: the 1623 characters (background then evaluation, sorted by path) are shuffled with a fixed
seed into 1100 meta-train / 100 meta-validation / 423 meta-test characters (learn2learn's benchmark
split sizes); each character's 0/90/180/270-degree rotations are four classes of the same split,
so there are 4 * 1623 = 6492 classes and no rotation of a test character is seen in meta-training.
"""

from __future__ import annotations

import hashlib
import io
import random
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import atomic_write_bytes
from engine.errors import DataError
from tasks.image_classes import SPLITS, ImageClasses

SUBSETS = ("images_background", "images_evaluation")
CHARACTERS, DRAWINGS, SIZE = 1623, 20, 28
SPLIT_SIZES = {"train": 1100, "validation": 100, "test": 423}
SPLIT_SEED = 1623  # fixed: the character split never depends on a run's seed
ROTATIONS = 4
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"


def character_folders(root: Path) -> list[Path]:
    """The 1623 character folders under `root/omniglot-py`, background first, each sorted by name."""
    base = root / "omniglot-py"
    missing = [s for s in SUBSETS if not (base / s).is_dir()]
    if missing:
        raise DataError(
            f"Omniglot not found: {', '.join(str(base / s) for s in missing)} missing. Point --data-root "
            "(or data.root) at the folder that holds omniglot-py/images_background and images_evaluation"
        )
    folders = [c for s in SUBSETS for a in sorted((base / s).iterdir()) if a.is_dir()
               for c in sorted(a.iterdir()) if c.is_dir()]
    if len(folders) != CHARACTERS:
        raise DataError(f"Omniglot under {base} has {len(folders)} character folders, expected {CHARACTERS}")
    return folders


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def cache_key(root: Path, files: list[Path]) -> str:
    """A hash of each file's path under `root`, size and modification time (ns)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_omniglot(root: Path, cache_dir: Path = CACHE_DIR, workers: int = 2) -> torch.Tensor:
    """uint8 tensor [1623, 20, 28, 28] (ink = 255), decoded once and cached."""
    folders = character_folders(root)
    files = [sorted(f.glob("*.png")) for f in folders]
    bad = [(f, len(pngs)) for f, pngs in zip(folders, files, strict=True) if len(pngs) != DRAWINGS]
    if bad:
        raise DataError(f"Omniglot character folder {bad[0][0]} holds {bad[0][1]} PNGs, expected {DRAWINGS}")
    flat = [p for pngs in files for p in pngs]
    cache = cache_dir / f"omniglot-{SIZE}-{cache_key(root, flat)}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    try:
        with Pool(workers) as pool:
            images = pool.map(_decode, flat, chunksize=256)
    except OSError as exc:
        raise DataError(f"cannot decode an Omniglot PNG under {root}: {exc}") from None
    data = torch.from_numpy(np.stack(images)).reshape(CHARACTERS, DRAWINGS, SIZE, SIZE)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(cache, lambda f: f.write(buffer.getvalue()))
    return data


def load_omniglot_splits(root: Path) -> dict[str, ImageClasses]:
    """The meta-train / meta-validation / meta-test character splits, rotations as extra classes."""
    data = load_omniglot(root)
    return {split: ImageClasses(*omniglot_split(data, split)) for split in SPLITS}


def split_characters() -> dict[str, list[int]]:
    """Character indices of each split (fixed seed, 1100/100/423)."""
    order = list(range(CHARACTERS))
    random.Random(SPLIT_SEED).shuffle(order)
    train, val = SPLIT_SIZES["train"], SPLIT_SIZES["validation"]
    return {"train": order[:train], "validation": order[train:train + val], "test": order[train + val:]}


def omniglot_split(data: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [n, 1, 28, 28], labels [n]) of one split, rotations as extra classes.

    Class `4 * c + r` is character `c` rotated by `r * 90` degrees.
    """
    chars = torch.tensor(split_characters()[split])
    base = data[chars]  # [C, 20, 28, 28]
    rotated = torch.stack([torch.rot90(base, r, dims=(-2, -1)) for r in range(ROTATIONS)], dim=1)
    images = rotated.reshape(-1, 1, SIZE, SIZE).contiguous()
    labels = (chars[:, None] * ROTATIONS + torch.arange(ROTATIONS)).repeat_interleave(DRAWINGS)
    return images, labels
