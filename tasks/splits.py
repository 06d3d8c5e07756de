"""Seeded splits of a set of examples into a kept part and a held-out part (validation or test)."""

from __future__ import annotations

import torch
from torch import Tensor


def _complement(num_examples: int, held: Tensor) -> Tensor:
    mask = torch.ones(num_examples, dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().squeeze(1)


def random_split(num_examples: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held) sorted index tensors; `held` is a seeded random round(fraction * N) of the examples."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.randperm(num_examples, generator=generator)[: round(fraction * num_examples)].sort().values
    return _complement(num_examples, held), held


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held) sorted index tensors; `held` is a seeded random round(fraction * N) of the examples
    with each class contributing in proportion to its size (largest-remainder rounding)."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quotas = counts.double() * fraction
    per_class = quotas.floor().long()
    remainder = round(fraction * len(labels)) - int(per_class.sum())
    per_class[torch.argsort(per_class - quotas, stable=True)[:remainder]] += 1
    held = []
    for label, count in zip(classes.tolist(), per_class.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held = torch.cat(held).sort().values
    return _complement(len(labels), held), held
