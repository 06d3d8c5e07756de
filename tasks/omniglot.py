"""Omniglot decoded once into memory: 1623 characters x 20 drawings, 28x28, as in learn2learn's benchmark.

The PNG tree (`omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png`) is decoded
with learn2learn's benchmark transform (Resize(28, LANCZOS), ToTensor, 1 - x) into one uint8 tensor
and cached under the project's `.cache/` folder, keyed by a hash of every file's name, size and
modification time (so a replaced image is decoded again); the data folder is only ever read.
Episodes then index that tensor and never touch PIL or the disk.

Split: Vinyals et al.'s, as the reference code uses it (through torchmeta's split files): with the characters in
path order (background then evaluation, alphabets and characters sorted), the first 1200 are meta-training
material and the last 423 (the evaluation set's last 12 alphabets and Gurmukhi's characters 42-45) meta-test;
of the 1200, the 172 characters of five background alphabets are meta-validation, 1028 meta-train. Each character
is one class. Meta-train episodes rotate each class by a random multiple of 90 degrees, drawn per episode
(`ImageClasses.rotate_classes`, tasks/episodes.py); meta-validation and meta-test classes are not rotated.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import atomic_write_bytes
from engine.errors import DataError
from tasks.image_classes import ImageClasses

SUBSETS = ("images_background", "images_evaluation")
CHARACTERS, DRAWINGS, SIZE = 1623, 20, 28
SPLIT_SIZES = {"train": 1028, "validation": 172, "test": 423}
VALIDATION_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")  # background set
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
        # forkserver: workers start from a clean process, not a fork of this one and its threads (TensorBoard's
        # writer, torch's pools), which can leave a fork holding a lock and hang the decode
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            images = pool.map(_decode, flat, chunksize=256)
    except OSError as exc:
        raise DataError(f"cannot decode an Omniglot PNG under {root}: {exc}") from None
    data = torch.from_numpy(np.stack(images)).reshape(CHARACTERS, DRAWINGS, SIZE, SIZE)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(cache, lambda f: f.write(buffer.getvalue()))
    return data


def load_omniglot_splits(root: Path) -> dict[str, ImageClasses]:
    """The meta-train / meta-validation / meta-test character splits (Vinyals'), meta-train classes rotated."""
    data = load_omniglot(root)
    splits = {split: ImageClasses(*omniglot_split(data, indices)) for split, indices in
              split_characters(character_folders(root)).items()}
    splits["train"].rotate_classes = True
    return splits


def split_characters(folders: list[Path]) -> dict[str, list[int]]:
    """Indices (in `folders`' order) of each split's characters: Vinyals' 1028 / 172 / 423."""
    train_and_validation = CHARACTERS - SPLIT_SIZES["test"]
    validation = [i for i, f in enumerate(folders[:train_and_validation]) if f.parent.name in VALIDATION_ALPHABETS]
    held = set(validation)
    return {"train": [i for i in range(train_and_validation) if i not in held], "validation": validation,
            "test": list(range(train_and_validation, CHARACTERS))}


def omniglot_split(data: torch.Tensor, characters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [n, 1, 28, 28], labels [n]) of `characters`, one class per character (its index)."""
    chars = torch.tensor(characters)
    images = data[chars].reshape(-1, 1, SIZE, SIZE).contiguous()
    return images, chars.repeat_interleave(DRAWINGS)
