"""Readers for MNIST, CIFAR-10, CIFAR-100 and SVHN in their official file formats.

The files sit under the data root in torchvision's layout. Each reader decodes them once into uint8
images (N, C, H, W) and int64 labels; nothing is cached or written, except by torchvision's downloader,
which is tried only when files are missing (and only when `download` is true).
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.errors import DataError
from tasks.data_files import corrupt, require_files, restored_on_failure


@dataclass(frozen=True)
class ImageData:
    """Official train and test splits of an image classification set."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int


def _torchvision_fetch(dataset: str, root: Path, download: bool) -> Callable[[], None] | None:
    """A callable that downloads `dataset` into `root` with torchvision, or None when downloads are off."""
    if not download:
        return None

    def fetch() -> None:
        from torchvision import datasets

        with restored_on_failure(root):
            if dataset == "svhn":
                for split in ("train", "test"):
                    datasets.SVHN(str(root / "svhn"), split=split, download=True)
            else:
                getattr(datasets, dataset)(str(root), download=True)

    return fetch


def _check_labels(path: Path, labels: np.ndarray, count: int, num_classes: int) -> Tensor:
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise corrupt(path, f"expected {count} integer labels, found {labels.dtype} {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise corrupt(path, f"labels outside 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


# --- MNIST: gzipped idx files ------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise corrupt(path, f"not a complete gzip file: {exc}") from None


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file: a big-endian magic number, `dims` big-endian sizes, then uint8 data."""
    data = _gunzip(path)
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise corrupt(path, f"expected an idx header with magic number {magic}")
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, dims + 1))
    if len(data) != header + int(np.prod(shape)):
        raise corrupt(path, f"{len(data) - header} data bytes for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_mnist(root: Path, download: bool = True) -> ImageData:
    """MNIST from `root/MNIST/raw/*-ubyte.gz`: 60,000 train and 10,000 test images (1, 28, 28)."""
    folder = root / "MNIST" / "raw"
    names = [name for pair in _MNIST_FILES.values() for name in pair]
    paths = dict(zip(names, require_files(folder, names, "MNIST", _torchvision_fetch("MNIST", root, download))))
    splits = {}
    for split, (image_name, label_name) in _MNIST_FILES.items():
        images = _read_idx(paths[image_name], 2051, 3)
        labels = _check_labels(paths[label_name], _read_idx(paths[label_name], 2049, 1), len(images), 10)
        splits[split] = (torch.from_numpy(images).unsqueeze(1), labels)
    return ImageData(splits["train"], splits["test"], 10)


# --- CIFAR-10 / CIFAR-100: pickled batches -------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a data file cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def unpickle_arrays(path: Path) -> Any:
    """A pickle of plain containers and NumPy arrays (no other object can be built from a data file)."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except PermissionError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # a broken pickle can raise almost anything
        raise corrupt(path, f"not a readable pickle: {type(exc).__name__}: {exc}") from None


def unpickle_cifar(path: Path) -> dict[str, Any]:
    """A CIFAR batch as a dict with str keys (the official files have bytes keys, re-created ones str)."""
    obj = unpickle_arrays(path)
    if not isinstance(obj, dict):
        raise corrupt(path, "expected a pickled dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    batch = unpickle_cifar(path)
    if "data" not in batch or label_key not in batch:
        raise corrupt(path, f"expected the keys 'data' and '{label_key}'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    labels = _check_labels(path, np.asarray(batch[label_key]), len(data), num_classes)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _read_cifar(
    folder: Path, names: dict[str, list[str]], label_key: str, num_classes: int, fetch: Callable[[], None] | None
) -> ImageData:
    dataset = "CIFAR-10" if num_classes == 10 else "CIFAR-100"
    all_names = names["train"] + names["test"]
    paths = dict(zip(all_names, require_files(folder, all_names, dataset, fetch)))
    splits = {}
    for split, split_names in names.items():
        parts = [_read_cifar_batch(paths[name], label_key, num_classes) for name in split_names]
        splits[split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return ImageData(splits["train"], splits["test"], num_classes)


def read_cifar10(root: Path, download: bool = True) -> ImageData:
    """CIFAR-10 from `root/cifar-10-batches-py/`: 50,000 train and 10,000 test images (3, 32, 32)."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    fetch = _torchvision_fetch("CIFAR10", root, download)
    return _read_cifar(root / "cifar-10-batches-py", names, "labels", 10, fetch)


def read_cifar100(root: Path, download: bool = True) -> ImageData:
    """CIFAR-100 from `root/cifar-100-python/{train,test}`, with the 100 fine labels."""
    fetch = _torchvision_fetch("CIFAR100", root, download)
    return _read_cifar(root / "cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", 100, fetch)


# --- SVHN: MATLAB files (format 2, cropped digits) -----------------------------------------------------


def _read_svhn_mat(path: Path) -> tuple[Tensor, Tensor]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except PermissionError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # scipy raises many types for a broken .mat file
        raise corrupt(path, f"not a readable MATLAB file: {type(exc).__name__}: {exc}") from None
    if "X" not in mat or "y" not in mat:
        raise corrupt(path, "expected the variables 'X' and 'y'")
    images, labels = mat["X"], mat["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise corrupt(path, f"'X' is {images.dtype} {images.shape}, expected uint8 (32, 32, 3, N)")
    count = images.shape[3]
    if labels.shape != (count, 1) or (count and (labels.min() < 1 or labels.max() > 10)):
        raise corrupt(path, f"'y' should be ({count}, 1) with labels 1..10")
    # Label 10 is the digit 0.
    labels = torch.from_numpy(labels.reshape(-1).astype(np.int64) % 10)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), labels


def read_svhn(root: Path, download: bool = True) -> ImageData:
    """SVHN from `root/svhn/{train,test}_32x32.mat`: 73,257 train and 26,032 test digits (3, 32, 32)."""
    fetch = _torchvision_fetch("svhn", root, download)
    train, test = require_files(root / "svhn", ["train_32x32.mat", "test_32x32.mat"], "SVHN", fetch)
    return ImageData(_read_svhn_mat(train), _read_svhn_mat(test), 10)
