"""Model registry: every model builds for its input shapes, gives (B, outputs), and works under torch.func."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jvp, replace_all_batch_norm_modules_

from engine.errors import ConfigError
from tasks.models import FLAT_INPUT_MODELS, SINGLE_TASK_MODELS, build_model

MNIST, CIFAR, SMALL, TABULAR = (1, 28, 28), (3, 32, 32), (3, 12, 12), (10,)
LIGHT = [name for name in SINGLE_TASK_MODELS if name != "wrn28_10"]


def _cases() -> list[tuple[str, tuple[int, ...], int]]:
    cases = [(name, shape, 10) for name in LIGHT for shape in (MNIST, CIFAR)]
    cases += [(name, TABULAR, 1) for name in sorted(FLAT_INPUT_MODELS)]
    return cases + [("resnet18", CIFAR, 100)]


@pytest.mark.parametrize(("name", "shape", "outputs"), _cases())
def test_model_output_shape(name, shape, outputs) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, outputs)
    assert model(torch.randn(3, *shape)).shape == (3, outputs)
    assert not any(getattr(module, "inplace", False) for module in model.modules())


def test_wrn28_10_forward_on_a_tiny_batch() -> None:
    model = build_model("wrn28_10", CIFAR, 10)
    assert 36_000_000 < sum(p.numel() for p in model.parameters()) < 37_000_000  # the paper's 36.5M
    with torch.no_grad():
        assert model(torch.randn(2, *CIFAR)).shape == (2, 10)


@pytest.mark.parametrize("name", LIGHT)
def test_forward_mode_jvp_through_the_model(name) -> None:
    """The trainer pushes tangents through the model with torch.func.jvp (batch norm on batch statistics).
    Small 12x12 images keep it fast: the models pool adaptively (the authors' unpadded LeNet-5 takes MNIST's)."""
    torch.manual_seed(0)
    shape = MNIST if name == "lenet5" else SMALL
    model = build_model(name, shape, 10)
    replace_all_batch_norm_modules_(model)
    model.eval()  # a fixed dropout mask; batch norm still uses batch statistics after the replacement
    x = torch.randn(2, *shape)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    out, tangent_out = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
    assert out.shape == tangent_out.shape == (2, 10)
    # <J t, w> must equal <t, J^T w> from reverse mode.
    weights = torch.randn_like(out)
    params = {k: v.requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad((functional_call(model, params, (x,)) * weights).sum(), list(params.values()))
    reverse = sum((g * tangents[k]).sum() for k, g in zip(params, grads))
    assert torch.allclose((tangent_out * weights).sum(), reverse, rtol=1e-3)


def test_unknown_model_and_image_model_on_flat_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="valid names: linear, mlp, lenet5, allcnnc, vgg16, resnet18"):
        build_model("resnet50", CIFAR, 10)
    with pytest.raises(ConfigError, match="needs image inputs"):
        build_model("lenet5", TABULAR, 1)
    with pytest.raises(ConfigError, match="at least 16x16.*use 'lenet5_relu'"):
        build_model("lenet5", SMALL, 10)


@pytest.mark.parametrize(("shape", "flat"), [(MNIST, 16 * 4 * 4), (CIFAR, 16 * 5 * 5)])
def test_lenet5_is_the_authors_tanh_average_pooling_net_with_xavier_weights(shape, flat) -> None:
    torch.manual_seed(0)
    model = build_model("lenet5", shape, 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds.count("Tanh") == 4 and kinds.count("AvgPool2d") == 2 and "ReLU" not in kinds
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert all(c.padding == (0, 0) for c in convs) and linears[0].in_features == flat
    for layer in convs + linears:  # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out))
        fan_in, fan_out = layer.weight[0].numel(), layer.weight.shape[0] * layer.weight[0, 0].numel()
        assert layer.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
    assert all((layer.bias == 0).all() for layer in linears)
    assert not all((conv.bias == 0).all() for conv in convs)  # the authors keep PyTorch's conv biases


def test_mlp_is_the_authors_xavier_mlp_and_the_torch_init_one_keeps_its_name() -> None:
    torch.manual_seed(0)
    authors, torch_init = build_model("mlp", TABULAR, 1), build_model("mlp_torch_init", TABULAR, 1)
    for ours, theirs in zip(authors.parameters(), torch_init.parameters(), strict=True):
        assert ours.shape == theirs.shape
    first = authors[1]
    assert (first.bias == 0).all() and first.weight.abs().max() <= (6 / (10 + 1000)) ** 0.5
    assert not (torch_init[1].bias == 0).all()


def test_episodic_backbones_have_the_references_widths_and_activations() -> None:
    """ResNet-12 is the reference's AdaResNet: 64-128-256-512 channels, ReLU, the third unit of a block without its
    own ReLU (it follows the shortcut's sum); 4-CONV at 128 filters is its adaconv128 width (0.82M parameters)."""
    resnet = build_model("resnet12", (3, 84, 84), 5)
    assert [block.units[0].conv.out_channels for block in resnet.blocks] == [64, 128, 256, 512]
    assert [[unit.relu for unit in block.units] for block in resnet.blocks] == [[True, True, False]] * 4
    block, x = resnet.blocks[1], torch.randn(4, 64, 8, 8)
    out = x
    for unit in block.units:
        out = unit(out)
    expected = torch.nn.functional.max_pool2d(torch.relu(out + block.shortcut(x)), 2)
    torch.testing.assert_close(block(x), expected)
    assert (out < 0).any()  # the third unit's output is not rectified before the sum
    wide = build_model("conv4", (3, 84, 84), 5, filters=128, adapted_blocks=2, warp=True, film=True)
    assert round(sum(p.numel() for p in wide.parameters()) / 1e6, 2) == 0.82
