"""Single-task supervised learning: a data set's train/val/test splits, batching and the registry.

Protocol (the project's AdaLFL design notes):
- validation is a seeded `val_fraction` of the *training* set (stratified by class for classification,
  plain random for regression), never taken from the test set;
- inputs are normalised with statistics of the train split (what remains after taking validation out):
  per-channel mean/std for images, per-feature mean/std for tabular features;
- the regression sets have no official test split: a fixed 80/20 split of the file, seeded with
  `TABULAR_SPLIT_SEED` whatever the run seed, so every run tests on the same rows. Missing features
  are imputed with the train-split mean (0 when a feature is missing in every train row), and the
  target is standardised with train-split statistics too, so a regression MSE is on the standardised
  target (multiply by `target_std ** 2` for the original units).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from engine.errors import ConfigError
from engine.rng import step_generator
from tasks.augment import random_crop_flip
from tasks.image_datasets import ImageData, read_cifar10, read_cifar100, read_mnist, read_svhn
from tasks.splits import random_split, stratified_split
from tasks.tabular_datasets import read_california_housing, read_communities_crime, read_diabetes

TABULAR_TEST_FRACTION = 0.2
TABULAR_SPLIT_SEED = 20230131
BATCH_STREAM = 17  # the step_generator stream of `batch_indices`' permutations


@dataclass
class SupervisedTask:
    """A data set held in memory as compact tensors, with what is needed to serve model-ready batches.

    `splits` maps "train", "val", "test" to (inputs, targets): uint8 images (N, C, H, W) or float32
    features (N, D); int64 class ids or float32 regression values (N,). Inputs are normalised as
    `(x - input_mean) / input_std` when batched (no normalisation when `input_mean` is None).
    """

    name: str
    kind: Literal["classification", "regression"]
    num_outputs: int
    input_shape: tuple[int, ...]
    splits: dict[str, tuple[Tensor, Tensor]]
    input_mean: Tensor | None = None
    input_std: Tensor | None = None
    crop_padding: int = 0
    flip: bool = False
    target_mean: float = 0.0
    target_std: float = 1.0

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self.splits:
            raise ConfigError(f"unknown split {split!r} of {self.name}; valid: {', '.join(self.splits)}")
        return self.splits[split]

    def size(self, split: str) -> int:
        """The number of examples in `split`."""
        return len(self._split(split)[1])

    def batch(
        self,
        split: str,
        indices: Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Float model inputs (normalised with train-split statistics) and targets, on `device`.

        Random crop (zero padding `crop_padding`) and horizontal flip (`flip`) are applied only to the
        train split and only when a generator is given; the generator drives every random choice.
        """
        inputs, targets = self._split(split)
        indices = indices.to(inputs.device)
        x, y = inputs[indices], targets[indices]
        if device is not None:
            x, y = x.to(device), y.to(device)
        if split == "train" and generator is not None and (self.crop_padding > 0 or self.flip):
            x = random_crop_flip(x, self.crop_padding, self.flip, generator)
        x = x.float()
        if self.input_mean is not None and self.input_std is not None:
            x = (x - self.input_mean.to(x.device)) / self.input_std.to(x.device)
        return x, y

    def to(self, device: torch.device | str) -> SupervisedTask:
        """A copy whose stored tensors live on `device`."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        splits = {name: (x.to(device), y.to(device)) for name, (x, y) in self.splits.items()}
        return dataclasses.replace(
            self, splits=splits, input_mean=move(self.input_mean), input_std=move(self.input_std)
        )


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(num_examples, generator=step_generator(seed, epoch, stream=BATCH_STREAM))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The example indices of training batch number `step` (from 0).

    Epochs are random permutations determined by (seed, epoch); the last partial batch of each epoch is
    dropped. A pure function of its arguments, so a resumed run sees the same batches.
    """
    batches_per_epoch = num_examples // batch_size
    if batches_per_epoch == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the {num_examples} examples to batch")
    epoch, position = divmod(step, batches_per_epoch)
    return _epoch_permutation(num_examples, seed, epoch)[position * batch_size : (position + 1) * batch_size].clone()


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), as float32 (C, 1, 1)."""
    levels = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = (counts * levels).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means).float().view(-1, 1, 1), torch.stack(stds).float().view(-1, 1, 1)


def _image_task(
    name: str,
    reader: Callable[[Path, bool], ImageData],
    padding: int,
    flip: bool,
    root: Path,
    val_fraction: float,
    seed: int,
    augment: bool,
    download: bool,
) -> SupervisedTask:
    data = reader(root, download)
    images, labels = data.train
    kept, held = stratified_split(labels, val_fraction, seed)
    splits = {"train": (images[kept], labels[kept]), "val": (images[held], labels[held]), "test": data.test}
    mean, std = channel_stats(splits["train"][0])
    return SupervisedTask(
        name=name,
        kind="classification",
        num_outputs=data.num_classes,
        input_shape=tuple(images.shape[1:]),
        splits=splits,
        input_mean=mean,
        input_std=std,
        crop_padding=padding if augment else 0,
        flip=flip and augment,
    )


def _tabular_task(
    name: str,
    reader: Callable[[Path], tuple[Tensor, Tensor]],
    root: Path,
    val_fraction: float,
    seed: int,
    augment: bool,
    download: bool,
) -> SupervisedTask:
    features, target = reader(root)
    rest, test = random_split(len(target), TABULAR_TEST_FRACTION, TABULAR_SPLIT_SEED)
    kept, held = random_split(len(rest), val_fraction, seed)
    train, val = rest[kept], rest[held]
    fill = features[train].nanmean(dim=0).nan_to_num(0.0)
    features = torch.where(features.isnan(), fill, features)
    mean, std = features[train].mean(dim=0), features[train].std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    target_mean, target_std = target[train].mean(), target[train].std(correction=0)
    target = (target - target_mean) / target_std
    splits = {
        split: (features[index].float(), target[index].float())
        for split, index in (("train", train), ("val", val), ("test", test))
    }
    return SupervisedTask(
        name=name,
        kind="regression",
        num_outputs=1,
        input_shape=(features.shape[1],),
        splits=splits,
        input_mean=mean.float(),
        input_std=std.float(),
        target_mean=float(target_mean),
        target_std=float(target_std),
    )


DATASETS: dict[str, Callable[..., SupervisedTask]] = {
    "mnist": functools.partial(_image_task, "mnist", read_mnist, 0, False),
    "cifar10": functools.partial(_image_task, "cifar10", read_cifar10, 4, True),
    "cifar100": functools.partial(_image_task, "cifar100", read_cifar100, 4, True),
    "svhn": functools.partial(_image_task, "svhn", read_svhn, 4, False),
    "diabetes": functools.partial(_tabular_task, "diabetes", read_diabetes),
    "california_housing": functools.partial(_tabular_task, "california_housing", read_california_housing),
    "communities_crime": functools.partial(_tabular_task, "communities_crime", read_communities_crime),
}


def load_task(
    name: str,
    root: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    *,
    download: bool = True,
) -> SupervisedTask:
    """The data set `name` from the data root, split into train/val/test (see the module docstring).

    `augment` turns on crop (+ flip, not for SVHN) for the CIFAR-style image sets; MNIST and the tabular
    sets are never augmented. Missing image files are downloaded with torchvision when `download` is true
    and that is possible; otherwise, and for missing or corrupt files in general, a DataError says what to fix.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    return DATASETS[name](Path(root), val_fraction, seed, augment, download)
