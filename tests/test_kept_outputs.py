"""The forward-mode product with the real forward's kept layer outputs equals forward-mode AD's, and falls back
to it wherever a kept output does not fit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adalfl import AdaptiveLoss
from adalfl.kept_outputs import kept_layer_outputs
from adalfl.online_step import batch_statistics_only, capture_rng, model_jvp
from tasks.models import build_model


def products(model: nn.Module, x: torch.Tensor, kept_from: torch.Tensor | None = None):
    """(forward-mode AD's product, the product with kept outputs, how many outputs were kept), in float64, at
    random tangents of the trainable parameters; the outputs are kept from a real forward on `kept_from` (x)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    rng = capture_rng(x.device)
    with batch_statistics_only(model):
        reference = model_jvp(model, params, tangents, x, rng)
        with torch.random.fork_rng(), kept_layer_outputs(model) as kept:
            torch.set_rng_state(rng["cpu"])
            model(x if kept_from is None else kept_from)
        count = sum(entry is not None for calls in kept.calls.values() for entry in calls)
        return reference, model_jvp(model, params, tangents, x, rng, kept), count


@pytest.mark.parametrize(("name", "shape"), [("lenet5", (1, 28, 28)), ("lenet5_relu", (1, 28, 28)), ("mlp", (8,)),
                                             ("allcnnc", (3, 16, 16)), ("resnet18", (3, 16, 16))])
def test_the_product_with_kept_outputs_equals_forward_mode_ad(name: str, shape: tuple[int, ...]) -> None:
    """The authors' LeNet-5 (tanh, average pooling), ReLU and max pooling, an MLP, dropout (All-CNN-C) and batch
    norm with functional ReLUs and residual additions (ResNet-18)."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).double().train()
    reference, product, count = products(model, torch.randn(4, *shape, dtype=torch.double))
    assert count >= 3
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)


def calls_of(monkeypatch: pytest.MonkeyPatch, *classes: type[nn.Module]) -> list[type[nn.Module]]:
    """A list that records every call of the classes' own forward."""
    calls = []
    for cls in classes:
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, x, _f=forward, _c=cls: calls.append(_c) or _f(self, x))
    return calls


def test_kept_layers_skip_their_primal(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.double)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    rng = capture_rng(x.device)
    with kept_layer_outputs(model) as kept:
        model(x)
    calls = calls_of(monkeypatch, nn.Conv2d, nn.Linear, nn.Tanh)
    model_jvp(model, params, tangents, x, rng, kept)
    assert calls == []  # every one of them came from the kept forward
    model_jvp(model, params, tangents, x, rng)
    assert calls.count(nn.Conv2d) == 2 and calls.count(nn.Linear) == 3 and calls.count(nn.Tanh) == 4


def test_an_output_changed_in_place_is_computed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-place ReLU after a linear layer changes its kept output: that layer is computed in full."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3), nn.Tanh()).double()
    calls = calls_of(monkeypatch, nn.Linear)
    reference, product, count = products(model, torch.randn(6, 5, dtype=torch.double))
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)
    assert count == 3  # both linear layers and the tanh; the in-place ReLU is not kept
    assert calls == [nn.Linear] * 2 + [nn.Linear] * 2 + [nn.Linear]  # reference, kept forward, one recomputed


class SharedAndFrozen(nn.Module):
    """One linear layer called twice, a layer with a frozen weight and a trained bias, and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.bias_only, self.frozen = nn.Linear(4, 4), nn.Conv1d(1, 2, 3), nn.Linear(4, 4)
        self.bias_only.weight.requires_grad_(False)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.shared(torch.tanh(self.shared(self.frozen(x)))))
        return self.bias_only(hidden.unsqueeze(1)).flatten(1)


def test_shared_layers_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = SharedAndFrozen().double()
    reference, product, count = products(model, torch.randn(5, 4, dtype=torch.double))
    assert count == 4
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)


def test_outputs_kept_from_other_inputs_are_not_used() -> None:
    """Kept from a batch of 6, used on a batch of 4: every layer is computed in full, and the product is right."""
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.double)
    reference, product, _ = products(model, x, kept_from=torch.randn(6, 1, 28, 28, dtype=torch.double))
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)


def test_an_update_step_leaves_no_hooks_or_forwards_behind() -> None:
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = AdaptiveLoss(num_outputs=10, update_every=1)
    stats = loss.step(model, optimizer, (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))))
    assert stats.meta_grad_norm is not None and bool(stats.finite)
    assert all(not m._forward_hooks and "forward" not in vars(m) for m in model.modules())
    assert F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 1])).isfinite()


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_keep_outputs_changes_the_cost_not_the_update(monkeypatch: pytest.MonkeyPatch, optimizer_name: str) -> None:
    """AdaptiveLoss(keep_outputs=False) computes the product's primal again: the same loss update, two more
    convolution calls (the real forward, the meta forward and, without kept outputs, the product: 2 + 2 (+ 2))."""
    calls = calls_of(monkeypatch, nn.Conv2d)
    updated, initial = [], []
    for keep in (True, False):
        torch.manual_seed(0)
        model = build_model("lenet5", (1, 28, 28), 10).double()
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                     else torch.optim.Adam(model.parameters(), lr=1e-3))
        loss = AdaptiveLoss(num_outputs=10, update_every=1, keep_outputs=keep).double()
        initial.append(torch.cat([p.detach().flatten() for p in loss.parameters()]))
        batch = (torch.randn(8, 1, 28, 28, dtype=torch.double), torch.randint(0, 10, (8,)))
        loss.step(model, optimizer, batch)
        calls.clear()
        loss.step(model, optimizer, batch)
        assert len(calls) == (4 if keep else 6)
        updated.append(torch.cat([p.detach().flatten() for p in loss.parameters()]))
    torch.testing.assert_close(initial[0], initial[1], rtol=0, atol=0)
    torch.testing.assert_close(updated[0], updated[1], rtol=1e-10, atol=1e-12)
    assert (updated[0] - initial[0]).abs().max() > 1e-4  # the loss was updated


class Unusual(nn.Module):
    """A linear layer whose forward hook changes its output, one called by keyword, an identity on a tuple, a
    sigmoid, a subclass of nn.Linear that computes something else, and a parametrized layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hooked, self.keyword, self.sigmoid = nn.Linear(5, 6), nn.Linear(6, 6), nn.Sigmoid()
        self.hooked.register_forward_hook(lambda _layer, _args, output: output + 0.5)
        self.placeholder = nn.Identity()

        class Doubled(nn.Linear):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 2 * super().forward(x)

        self.doubled = Doubled(6, 4)
        self.parametrized = nn.Linear(4, 3)
        torch.nn.utils.parametrize.register_parametrization(self.parametrized, "weight", nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.placeholder((F.relu(self.hooked(x)), x))
        return self.parametrized(self.doubled(self.sigmoid(self.keyword(input=hidden))))


def test_hooks_keyword_calls_non_tensors_subclasses_and_parametrizations() -> None:
    """Kept before the layer's own forward hooks (which run again in the product); a keyword call and a call on a
    tuple keep nothing; a subclass and a parametrized layer are not kept; the sigmoid's tangent from its output."""
    torch.manual_seed(0)
    model = Unusual().double()
    reference, product, count = products(model, torch.randn(6, 5, dtype=torch.double))
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)
    assert count == 3  # the hooked linear layer, the sigmoid and the tanh inside the parametrization
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = AdaptiveLoss(num_outputs=3, update_every=1).double().step(
        model, optimizer, (torch.randn(6, 5, dtype=torch.double), torch.randint(0, 3, (6,))))
    assert bool(stats.finite)


def test_a_global_forward_hook_keeps_nothing() -> None:
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10).double()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda layer, _args, output: output + 0.5 if isinstance(layer, nn.Conv2d) else None)
    try:
        reference, product, count = products(model, torch.randn(4, 1, 28, 28, dtype=torch.double))
    finally:
        handle.remove()
    assert count == 0
    torch.testing.assert_close(product, reference, rtol=1e-10, atol=1e-12)


class GradModeBranch(nn.Module):
    """Calls its first layer once more, on another input of the same shape, when grad mode is on (`extra_with_grad`)
    or when it is off (the product runs under no_grad)."""

    def __init__(self, extra_with_grad: bool) -> None:
        super().__init__()
        self.first, self.second, self.extra_with_grad = nn.Linear(5, 5), nn.Linear(5, 3), extra_with_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() == self.extra_with_grad:
            self.first(x.flip(0))  # e.g. an auxiliary output for logging
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("extra_with_grad", [True, False])
def test_a_product_that_calls_layers_otherwise_runs_again_without_kept_outputs(extra_with_grad: bool) -> None:
    torch.manual_seed(0)
    model = GradModeBranch(extra_with_grad).double()
    x = torch.randn(6, 5, dtype=torch.double)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    rng = capture_rng(x.device)
    with kept_layer_outputs(model) as kept:
        model(x)
    reference = model_jvp(model, params, tangents, x, rng)
    torch.testing.assert_close(model_jvp(model, params, tangents, x, rng, kept), reference, rtol=1e-10, atol=1e-12)
    assert not kept.matched
