"""AdaptiveLoss: the loss updated at every k-th step only, plain steps with the current loss between."""

from __future__ import annotations

import copy
import warnings

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
    assert [restored.step(*copy.deepcopy((model, optimizer)), b).meta_loss is not None
            for b in data[3:]] == [False, True, False]
    with pytest.raises(ValueError, match="update_every must be at least 1"):
        AdaptiveLoss(num_outputs=3, update_every=0)


def test_ml3_runs_without_the_step_bound_unless_one_is_set() -> None:
    assert MetaConfig().grad_ratio("ml3") is None and MetaConfig().grad_ratio("adalfl") == 2.0
    assert MetaConfig(max_grad_ratio=1.5).grad_ratio("ml3") == 1.5
    assert MetaConfig(max_grad_ratio=None).grad_ratio("adalfl") is None


def test_the_component_is_a_module_whose_to_moves_the_meta_optimizer_state_too() -> None:
    model, optimizer, loss = setup(update_every=1)
    assert [id(p) for p in loss.parameters()] == [id(p) for p in loss.loss.parameters()]
    loss.step(model, optimizer, batches(1)[0])
    loss.double()
    model.double()
    assert all(p.dtype == torch.float64 for p in loss.parameters())
    assert all(v.dtype == torch.float64 for state in loss.meta_optimizer.state.values()
               for k, v in state.items() if k != "step")
    x, y = batches(1)[0]
    stats = loss.step(model, optimizer, (x.double(), y), adapt=True)
    assert bool(stats.finite) and loss(model(x.double()), y).dtype == torch.float64


def test_a_state_saved_with_other_settings_is_refused_and_a_load_copies_the_optimizer_state() -> None:
    model, optimizer, loss = setup(update_every=1)
    loss.step(model, optimizer, batches(1)[0])
    state = loss.state_dict()
    with pytest.raises(ValueError, match=r"form='residual' \(this loss: 'network'\)"):
        AdaptiveLoss(num_outputs=3, update_every=1, form="network").load_state_dict(state)
    with pytest.raises(ValueError, match="max_grad_ratio=2.0 \\(this loss: None\\)"):
        AdaptiveLoss(num_outputs=3, update_every=1, max_grad_ratio=None).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "settings"}  # a checkpoint from before settings were saved
    first, second = AdaptiveLoss(num_outputs=3, update_every=1), AdaptiveLoss(num_outputs=3, update_every=1)
    first.load_state_dict(legacy)
    second.load_state_dict(legacy)
    before = copy.deepcopy(second.meta_optimizer.state_dict())
    first.step(*copy.deepcopy((model, optimizer)), batches(2)[1])
    after = second.meta_optimizer.state_dict()
    for key in before["state"]:
        assert all(torch.equal(before["state"][key][k], after["state"][key][k]) for k in before["state"][key])


def test_mistakes_in_the_arguments_get_one_clear_error() -> None:
    model, optimizer, loss = setup(update_every=1)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="form must be one of 'residual', 'network', got 'resdual'"):
        AdaptiveLoss(num_outputs=3, form="resdual")
    with pytest.raises(ValueError, match=r"gives 3 outputs per example but .* num_outputs=5"):
        AdaptiveLoss(num_outputs=5).step(model, optimizer, (x, y))
    with pytest.raises(ValueError, match=r"class indices of an integer dtype shaped \[16\]"):
        loss.step(model, optimizer, (x, y.float()))
    with pytest.raises(TypeError, match="pass the model, not model.parameters"):
        loss.step(model.parameters(), optimizer, (x, y))
    with pytest.raises(TypeError, match="unpack a dict batch"):
        loss.step(model, optimizer, {"x": x, "y": y})
    other = torch.optim.SGD(nn.Linear(5, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
        loss.step(model, other, (x, y))


@pytest.mark.parametrize("labels", [lambda y: y.int(), lambda y: y.to(torch.uint8), lambda y: y[:, None]])
def test_labels_are_accepted_as_cross_entropy_takes_them(labels) -> None:
    x, y = batches(1)[0]
    results = []
    for target in (y, labels(y)):
        model, optimizer, loss = setup(update_every=1)
        stats = loss.step(model, optimizer, (x, target))
        results.append((stats.meta_loss, [p.detach() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_frozen_parameters_are_left_out_and_the_mode_is_restored() -> None:
    model, optimizer, loss = setup(update_every=1)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    model.eval()
    model[1].train()  # a mixed model: one module in train mode
    stats = loss.step(model, optimizer, batches(1)[0])
    assert stats.meta_loss is not None and bool(stats.finite)
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, setup(1)[0][2].weight)
    assert not model.training and model[1].training and not model[0].training


def test_bound_scale_says_how_much_the_bound_cut_the_step() -> None:
    model, optimizer, loss = setup(update_every=1)
    x, y = batches(1)[0]
    assert float(loss.step(model, optimizer, (x, y)).bound_scale) == 1.0  # starts as cross-entropy: not cut
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in loss.loss.net.layers:  # a loss far steeper than the task loss
            layer.weight.normal_(0.0, 5.0)
    scale = float(loss.step(model, optimizer, (x, y)).bound_scale)
    assert 0.0 < scale < 1.0
    assert AdaptiveLoss(num_outputs=3, max_grad_ratio=None).step(model, optimizer, (x, y)).bound_scale is None


def test_a_step_prints_no_deprecation_warning() -> None:
    model, optimizer, loss = setup(update_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.step(model, optimizer, batches(1)[0])
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
