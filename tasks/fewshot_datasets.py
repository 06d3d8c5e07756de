"""The few-shot data sets by name: each loader reads a data root and returns its meta-train / meta-validation /
meta-test class sets (`ImageClasses` keyed by `SPLITS`). The one list of few-shot data set names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.errors import ConfigError
from tasks.cifar100_fewshot import load_cifarfs, load_fc100
from tasks.cub200 import load_cub200
from tasks.image_classes import ImageClasses
from tasks.mini_imagenet import load_mini_imagenet_splits
from tasks.omniglot import load_omniglot_splits
from tasks.tiered_imagenet import load_tiered_imagenet

FEWSHOT_DATASETS: dict[str, Callable[[Path], dict[str, ImageClasses]]] = {
    "omniglot": load_omniglot_splits,
    "mini_imagenet": load_mini_imagenet_splits,
    "cifarfs": load_cifarfs,
    "fc100": load_fc100,
    "tieredimagenet": load_tiered_imagenet,
    "cub200": load_cub200,
}


def load_splits(dataset: str, root: Path) -> dict[str, ImageClasses]:
    """The meta-train / meta-validation / meta-test class sets of `dataset`."""
    if dataset not in FEWSHOT_DATASETS:
        raise ConfigError(f"data.dataset = {dataset!r} is not a few-shot data set; choose one of "
                          f"{', '.join(FEWSHOT_DATASETS)}")
    return FEWSHOT_DATASETS[dataset](root)
