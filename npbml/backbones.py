"""4-CONV and ResNet-12 backbones with optional warp and FiLM layers.

A `ConvUnit` is conv3x3 -> BatchNorm -> [FiLM] -> activation. A warp layer (a 3x3 conv,
Dirac-initialised so it starts as the identity) follows each pooled block, between that block and
the next adapted layer (the next block's conv + BN, or the head): it preconditions the gradients of
the layers around it (WarpGrad / T-Net). Placing it after the 2x2 pooling rather than directly after
the conv costs a quarter of the FLOPs for the same role (at 28x28 a warp before pooling would cost
more than the whole 4-CONV). Warp and FiLM layers are meta-learned and fixed in the inner loop;
`adapted_names` lists every other parameter. Batch norm always uses the batch's statistics (no
running buffers), as in MAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from npbml.film import FiLM

FIXED_IN_INNER_LOOP = ("warps", "film")  # parameter-name parts of the meta-only layers


def warp_layers(widths: list[int], enabled: bool) -> nn.ModuleList | None:
    """One identity-initialised 3x3 conv per width, or None when warping is off."""
    if not enabled:
        return None
    layers = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1, bias=False) for w in widths)
    for layer in layers:
        nn.init.dirac_(layer.weight)
    return layers


class ConvUnit(nn.Module):
    """conv3x3 -> BN -> [FiLM conditioned on the pooled unit input] -> activation."""

    def __init__(self, cin: int, cout: int, film: bool, slope: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)
        self.film = FiLM(cin, cout) if film else None
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))
        if self.film is not None:
            z = self.film(z, x.mean(dim=(2, 3)))
        return F.leaky_relu(z, self.slope) if self.slope else F.relu(z)


class Conv4(nn.Module):
    """Four conv units of `filters` channels with 2x2 max pooling, each followed by a warp; a linear head."""

    def __init__(self, in_shape: tuple[int, int, int], ways: int, filters: int, warp: bool, film: bool):
        super().__init__()
        channels = [in_shape[0]] + [filters] * 4
        self.units = nn.ModuleList(ConvUnit(a, b, film) for a, b in zip(channels[:-1], channels[1:]))
        self.warps = warp_layers(channels[1:], warp)
        side = in_shape[1]
        for _ in range(4):
            side //= 2
        self.head = nn.Linear(filters * side * side, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, unit in enumerate(self.units):
            x = F.max_pool2d(unit(x), 2)
            if self.warps is not None:
                x = self.warps[index](x)
        return self.head(x.flatten(1))


class ResBlock(nn.Module):
    """Three conv units (leaky ReLU 0.1) with a 1x1-conv shortcut, then 2x2 max pooling."""

    def __init__(self, cin: int, cout: int, film: bool) -> None:
        super().__init__()
        self.units = nn.ModuleList(ConvUnit(a, cout, film, slope=0.1) for a in (cin, cout, cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout, track_running_stats=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for unit in self.units:
            out = unit(out)
        return F.max_pool2d(F.leaky_relu(out + self.shortcut(x), 0.1), 2)


class ResNet12(nn.Module):
    """ResNet-12: four residual blocks of filters x (1, 2.5, 5, 10) channels, each followed by a warp;
    global pooling, a linear head."""

    def __init__(self, in_shape: tuple[int, int, int], ways: int, filters: int, warp: bool, film: bool):
        super().__init__()
        widths = [in_shape[0]] + [int(filters * m) for m in (1, 2.5, 5, 10)]
        self.blocks = nn.ModuleList(ResBlock(a, b, film) for a, b in zip(widths[:-1], widths[1:]))
        self.warps = warp_layers(widths[1:], warp)
        self.head = nn.Linear(widths[-1], ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if self.warps is not None:
                x = self.warps[index](x)
        return self.head(x.mean(dim=(2, 3)))


BACKBONES = {"conv4": Conv4, "resnet12": ResNet12}


def build_backbone(name: str, in_shape: tuple[int, int, int], ways: int, filters: int,
                   warp: bool = False, film: bool = False) -> nn.Module:
    return BACKBONES[name](in_shape, ways, filters, warp, film)


def adapted_names(model: nn.Module) -> list[str]:
    """Names of the parameters the inner loop adapts: all but the warp and FiLM layers'."""
    return [n for n, _ in model.named_parameters() if not set(n.split(".")) & set(FIXED_IN_INNER_LOOP)]
