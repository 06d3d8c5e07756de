"""The one model registry: every network the project builds, by name, for a task's input shape and outputs.

`MODELS` holds each model's builder, `build(input_shape, num_outputs, **options)`, with the inputs it takes and
whether it is an episodic backbone (tasks/backbones.py: a trunk and adapted blocks, with the options `filters`,
`adapted_blocks`, `warp` and `film`) or a single-task network (no options). To add a model, write its builder
and give it one line in `MODELS`.

The single-task convolutional models take (C, H, W) images of MNIST (1x28x28) or CIFAR (3x32x32) size: they end in
adaptive average pooling or compute their flattened size. No module works in place (no
ReLU(inplace=True), no `+=`), because the trainer differentiates through the models in forward mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ConfigError
from tasks.backbones import conv4, resnet12

MLP_WIDTH = 1000  # two hidden layers of 1000 units, the MLP of Baydin et al. (2018) used by the AdaLFL family


def linear(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A linear model on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def _xavier_uniform(model: nn.Module) -> nn.Module:
    """The authors' initialisation: Xavier-uniform weights on every convolution and linear layer, zero biases on
    the linear layers (convolution biases keep PyTorch's default)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


def mlp_torch_init(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A multilayer perceptron on the flattened input: two ReLU hidden layers of MLP_WIDTH units, PyTorch's
    default initialisation."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), MLP_WIDTH),
        nn.ReLU(),
        nn.Linear(MLP_WIDTH, MLP_WIDTH),
        nn.ReLU(),
        nn.Linear(MLP_WIDTH, num_outputs),
    )


def mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The authors' MLP (Decadz/Evolved-Model-Agnostic-Loss, models/mlp.py): `mlp_torch_init`'s layers with
    Xavier-uniform weights and zero biases."""
    return _xavier_uniform(mlp_torch_init(input_shape, num_outputs))


def _lenet5_size(size: int, pad: int) -> int:
    """Height or width after LeNet-5's two 5x5 convolutions (the first padded by `pad`) and 2x2 poolings."""
    return ((size + 2 * pad - 4) // 2 - 4) // 2


def lenet5_relu(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """LeNet-5 with ReLU and max-pooling, PyTorch's default initialisation; inputs smaller than 32x32 are
    zero-padded up to LeNet's 32x32 by the first convolution (2 pixels for MNIST)."""
    channels, height, width = input_shape
    pad = max(0, (32 - min(height, width)) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * _lenet5_size(height, pad) * _lenet5_size(width, pad), 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_outputs),
    )


def lenet5(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The authors' LeNet-5 (LeCun et al., 1998; Decadz/Evolved-Model-Agnostic-Loss, models/lenet5.py): tanh and
    2x2 average pooling, unpadded 5x5 convolutions (MNIST's 28x28 reaches 4x4, CIFAR's 32x32 5x5), Xavier-uniform
    weights and zero linear biases. It returns logits; the authors' softmax is the loss's (the same function)."""
    channels, height, width = input_shape
    if min(height, width) < 16:
        raise ConfigError(f"model 'lenet5' needs images of at least 16x16 (its 5x5 convolutions are unpadded); these "
                          f"are {height}x{width}: use 'lenet5_relu', which pads them")
    return _xavier_uniform(nn.Sequential(
        nn.Conv2d(channels, 6, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * _lenet5_size(height, 0) * _lenet5_size(width, 0), 120),
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, num_outputs),
    ))


def allcnnc(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """All-CNN-C (Springenberg et al., 2015, Table 2) as published: strided 3x3 convolutions instead of
    pooling, dropout 0.2 on the input and 0.5 after each strided layer, ReLU on every convolution
    (the class layer too), then global average pooling. No batch norm."""

    def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU()]

    return nn.Sequential(
        nn.Dropout(0.2),
        *conv(input_shape[0], 96),
        *conv(96, 96),
        *conv(96, 96, stride=2),
        nn.Dropout(0.5),
        *conv(96, 192),
        *conv(192, 192),
        *conv(192, 192, stride=2),
        nn.Dropout(0.5),
        *conv(192, 192, padding=0),
        *conv(192, 192, kernel=1, padding=0),
        *conv(192, num_outputs, kernel=1, padding=0),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def vgg16(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """VGG-16 with batch norm (Simonyan & Zisserman, 2015) in its CIFAR form: the 13 convolutions, then
    a single linear layer on the 512 pooled features. Pooling rounds up so 28x28 inputs reach 1x1."""
    layers: list[nn.Module] = []
    cin = input_shape[0]
    for stage in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for cout in stage:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_outputs))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block (post-activation)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """ResNet-18 (He et al., 2016) with the CIFAR stem: a 3x3 stride-1 convolution and no max-pooling."""
    layers: list[nn.Module] = [_conv3x3(input_shape[0], 64), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_outputs))


class WideBlock(nn.Module):
    """WideResNet's pre-activation block (BN-ReLU-conv twice); a 1x1 convolution of the activated input
    is the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + shortcut


def wide_resnet(depth: int, widen: int, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """WRN-depth-widen (Zagoruyko & Komodakis, 2016) for CIFAR: three groups of (depth - 4) / 6 blocks
    of widths 16k, 32k, 64k; no dropout (the paper's default)."""
    blocks = (depth - 4) // 6
    layers: list[nn.Module] = [_conv3x3(input_shape[0], 16)]
    cin = 16
    for cout, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
        for i in range(blocks):
            layers.append(WideBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    head = [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_outputs)]
    return nn.Sequential(*layers, *head)


def wrn16_8(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """WideResNet 16-8."""
    return wide_resnet(16, 8, input_shape, num_outputs)


def wrn28_10(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """WideResNet 28-10."""
    return wide_resnet(28, 10, input_shape, num_outputs)


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # build(input_shape, num_outputs, **options)
    inputs: Literal["flat", "image"]  # flat feature vectors, or (channels, height, width) images
    episodic: bool = False  # an episodic backbone (trunk + adapted blocks) rather than a single-task network


MODELS: dict[str, ModelEntry] = {
    "linear": ModelEntry(linear, "flat"),
    "mlp": ModelEntry(mlp, "flat"),
    "lenet5": ModelEntry(lenet5, "image"),
    "allcnnc": ModelEntry(allcnnc, "image"),
    "vgg16": ModelEntry(vgg16, "image"),
    "resnet18": ModelEntry(resnet18, "image"),
    "wrn16_8": ModelEntry(wrn16_8, "image"),
    "wrn28_10": ModelEntry(wrn28_10, "image"),
    # this project's MLP and LeNet-5 before they became the authors' (README)
    "mlp_torch_init": ModelEntry(mlp_torch_init, "flat"),
    "lenet5_relu": ModelEntry(lenet5_relu, "image"),
    "conv4": ModelEntry(conv4, "image", episodic=True),
    "resnet12": ModelEntry(resnet12, "image", episodic=True),
}
FLAT_INPUT_MODELS = frozenset(name for name, entry in MODELS.items() if entry.inputs == "flat")
SINGLE_TASK_MODELS = tuple(name for name, entry in MODELS.items() if not entry.episodic)
BACKBONES = tuple(name for name, entry in MODELS.items() if entry.episodic)


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
    """The model `name` for inputs of `input_shape` (one example) and `num_outputs` outputs; `options` go to an
    episodic backbone's builder."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if MODELS[name].inputs == "image" and len(input_shape) != 3:
        raise ConfigError(
            f"model {name!r} needs image inputs (channels, height, width), but this task's inputs have "
            f"shape {tuple(input_shape)}; use one of: {', '.join(sorted(FLAT_INPUT_MODELS))}"
        )
    return MODELS[name].build(tuple(input_shape), num_outputs, **options)
