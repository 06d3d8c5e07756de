"""AdaptiveLoss: the loss updated at every k-th step only, plain steps with the current loss between."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adalfl import AdaptiveLoss
from adalfl.config import MetaConfig


def setup(update_every: int) -> tuple[nn.Module, torch.optim.Optimizer, AdaptiveLoss]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, AdaptiveLoss(num_outputs=3, update_every=update_every)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator))
            for _ in range(count)]


def loss_parameters(loss: AdaptiveLoss) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loss.loss.parameters()]


def test_the_loss_is_updated_at_every_kth_step_only() -> None:
    model, optimizer, loss = setup(update_every=3)
    updated = []
    for batch in batches(7):
        before = loss_parameters(loss)
        stats = loss.step(model, optimizer, batch)
        changed = any(not torch.equal(a, b) for a, b in zip(before, loss_parameters(loss), strict=True))
        assert changed == (stats.meta_loss is not None)
        updated.append(changed)
    assert updated == [True, False, False, True, False, False, True]


def test_the_steps_between_are_plain_steps_with_the_current_loss() -> None:
    """Every k-th update with k = 2 equals alternating adapt=True / adapt=False calls, parameter for parameter."""
    scheduled, explicit = setup(update_every=2), setup(update_every=1)
    for k, batch in enumerate(batches(6)):
        scheduled[2].step(scheduled[0], scheduled[1], batch)
        explicit[2].step(explicit[0], explicit[1], batch, adapt=k % 2 == 0)
    for a, b in zip(scheduled[0].parameters(), explicit[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert explicit[2].scheduled_steps == 0 and scheduled[2].scheduled_steps == 6


def test_the_schedule_survives_a_state_dict_round_trip() -> None:
    model, optimizer, loss = setup(update_every=4)
    data = batches(6)
    for batch in data[:3]:
        loss.step(model, optimizer, batch)
    restored = AdaptiveLoss(num_outputs=3, update_every=4)
    restored.load_state_dict(copy.deepcopy(loss.state_dict()))
    assert [restored.step(copy.deepcopy(model), copy.deepcopy(optimizer), b).meta_loss is not None
            for b in data[3:]] == [False, True, False]
    with pytest.raises(ValueError, match="update_every must be at least 1"):
        AdaptiveLoss(num_outputs=3, update_every=0)


def test_ml3_runs_without_the_step_bound_unless_one_is_set() -> None:
    assert MetaConfig().grad_ratio("ml3") is None and MetaConfig().grad_ratio("adalfl") == 2.0
    assert MetaConfig(max_grad_ratio=1.5).grad_ratio("ml3") == 1.5
    assert MetaConfig(max_grad_ratio=None).grad_ratio("adalfl") is None
