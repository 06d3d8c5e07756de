"""N-way K-shot episodes with learn2learn: `MetaDataset` + `Taskset` over an in-memory image tensor.

A task holds `ways * (shots + query)` examples (learn2learn's `KShots(k=shots + query)`), labels
remapped to 0..ways-1; `split_episode` cuts it into support and query sets per class. learn2learn
samples with Python's `random`, so seeding `random` (see `python_random`) replays the same tasks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from tasks.image_classes import ImageClasses
from tasks.learn2learn_import import import_learn2learn


@dataclass(frozen=True)
class Episode:
    """Support and query sets of one task, labels 0..ways-1."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device) -> Episode:
        return Episode(*(t.to(device, non_blocking=True) for t in
                         (self.support_x, self.support_y, self.query_x, self.query_y)))


def build_taskset(dataset: ImageClasses, ways: int, shots: int, query: int, num_tasks: int = -1):
    """A learn2learn `Taskset` of `ways`-way tasks with `shots + query` examples per class."""
    l2l = import_learn2learn()
    labels_to_indices: dict[int, list[int]] = {}
    for index, label in enumerate(dataset.labels):
        labels_to_indices.setdefault(label, []).append(index)
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices,
                                indices_to_labels=dict(enumerate(dataset.labels)))
    transforms = [
        l2l.data.transforms.NWays(meta, n=ways),
        l2l.data.transforms.KShots(meta, k=shots + query),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def split_episode(x: torch.Tensor, y: torch.Tensor, ways: int, shots: int) -> Episode:
    """The first `shots` examples of each class are the support set, the rest the query set."""
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    per_class = len(y) // ways
    x = x.reshape(ways, per_class, *x.shape[1:])
    y = y.reshape(ways, per_class)
    return Episode(
        x[:, :shots].reshape(-1, *x.shape[2:]), y[:, :shots].reshape(-1),
        x[:, shots:].reshape(-1, *x.shape[2:]), y[:, shots:].reshape(-1),
    )


def rotate_classes(episode: Episode, ways: int) -> Episode:
    """Each class's support and query images rotated by the same random multiple of 90 degrees (Python's `random`,
    so a seeded episode replays), as the reference rotates Omniglot's meta-train classes."""
    turns = [random.randrange(4) for _ in range(ways)]

    def rotated(x: torch.Tensor) -> torch.Tensor:
        per_class = x.reshape(ways, -1, *x.shape[1:])
        return torch.stack([torch.rot90(images, k, dims=(-2, -1)) for images, k in zip(per_class, turns, strict=True)]
                           ).reshape(x.shape)

    return Episode(rotated(episode.support_x), episode.support_y, rotated(episode.query_x), episode.query_y)


class EpisodeSampler:
    """Draws episodes from a taskset; `ways` and `shots` say how to split them."""

    def __init__(self, dataset: ImageClasses, ways: int, shots: int, query: int, num_tasks: int = -1) -> None:
        self.ways, self.shots = ways, shots
        self.data = dataset
        self.taskset = build_taskset(dataset, ways, shots, query, num_tasks)

    def sample(self) -> Episode:
        x, y = self.taskset.sample()
        episode = split_episode(x, y, self.ways, self.shots)
        return rotate_classes(episode, self.ways) if self.data.rotate_classes else episode

    def fixed(self, count: int, seed: int, first: int = 0, stride: int = 1) -> Iterator[Episode]:
        """Episodes first, first + stride, ... of `count` that are the same on every call with the same seed
        (each is seeded by its index: a torchrun rank draws its share alone)."""
        for index in range(first, count, stride):
            with python_random(seed * 1_000_003 + index):
                episode = self.sample()
            yield episode


@contextlib.contextmanager
def python_random(seed: int) -> Iterator[None]:
    """Seed Python's `random` (learn2learn's sampler) inside the block; restore its state after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


SPLIT_NAMES = {"train": "meta-train", "validation": "meta-validation", "test": "meta-test"}


def check_episodes_fit(splits: dict[str, ImageClasses], dataset: str, ways: int, shots: int, query: int) -> None:
    """ConfigError, naming the limits, when a split has fewer than `ways` classes or a class of one has fewer
    than `shots + query` examples: episodes (data.ways, data.shots, data.query) are drawn from every split."""
    sizes = {split: data.class_sizes() for split, data in splits.items()}
    classes = {split: len(s) for split, s in sizes.items()}
    fewest = {split: min(s, default=0) for split, s in sizes.items()}
    limit = min(classes, key=classes.__getitem__)
    if ways > classes[limit]:
        counts = ", ".join(f"{SPLIT_NAMES[split]} {n}" for split, n in classes.items())
        raise ConfigError(
            f"data.ways = {ways} but the {dataset} {SPLIT_NAMES[limit]} split has {classes[limit]} classes "
            f"(classes per split: {counts}); set data.ways to at most {classes[limit]}"
        )
    limit = min(fewest, key=fewest.__getitem__)
    if shots + query > fewest[limit]:
        counts = ", ".join(f"{SPLIT_NAMES[split]} {n}" for split, n in fewest.items())
        raise ConfigError(
            f"data.shots + data.query = {shots} + {query} = {shots + query} examples per class, but a class of the "
            f"{dataset} {SPLIT_NAMES[limit]} split has only {fewest[limit]} (fewest per class: {counts}); "
            f"lower data.shots and/or data.query so that they sum to at most {fewest[limit]}"
        )
