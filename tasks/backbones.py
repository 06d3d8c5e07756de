"""4-CONV and ResNet-12 backbones split into a trunk and adapted blocks, with optional warp and FiLM layers.

A backbone is a stack of pooled blocks and a linear head. The top `adapted_blocks` blocks and the head
are adapted in the inner loop; the blocks below them form the trunk, meta-learned in the outer loop
but fixed in the inner loop (the reference code adapts the top two of 4-CONV's blocks), so a learner
computes the trunk's output once per episode and reuses it in every inner step. `adapted_blocks=None`
adapts every block (MAML's setting).

Warp and FiLM layers sit in the adapted blocks only. A warp layer (a 3x3 conv, Dirac-initialised so it
starts as the identity) follows each adapted block, between it and the next adapted layer: it
preconditions the gradients of the layers around it (WarpGrad / T-Net). Placing it after the 2x2
pooling rather than directly after the conv costs a quarter of the FLOPs for the same role. A
`ConvUnit` is conv3x3 -> BatchNorm -> [FiLM] -> activation. Warp and FiLM layers are meta-learned and
fixed in the inner loop; `adapted_names` lists the parameters the inner loop changes. Batch norm always
uses the batch's statistics (no running buffers), as in MAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.film import FiLM

META_ONLY_LAYERS = ("warps", "film")  # parameter-name parts of the layers fixed in the inner loop


class ConvUnit(nn.Module):
    """conv3x3 -> BN -> [FiLM conditioned on the unit's input pooled over the batch] -> [ReLU]."""

    def __init__(self, cin: int, cout: int, film: bool, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)
        self.film = FiLM(cin, cout) if film else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.conv(x))
        if self.film is not None:
            z = self.film(z, x.mean(dim=(0, 2, 3)))
        return F.relu(z) if self.relu else z


class ConvBlock(nn.Module):
    """One 4-CONV block: a conv unit, then 2x2 max pooling."""

    def __init__(self, cin: int, cout: int, film: bool) -> None:
        super().__init__()
        self.unit = ConvUnit(cin, cout, film)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.unit(x), 2)


class ResBlock(nn.Module):
    """Three conv units, the third without its ReLU, added to a 1x1-conv shortcut, then ReLU and 2x2 max pooling
    (the reference's `adaresnet.py` block)."""

    def __init__(self, cin: int, cout: int, film: bool) -> None:
        super().__init__()
        self.units = nn.ModuleList(ConvUnit(a, cout, film, relu=i < 2) for i, a in enumerate((cin, cout, cout)))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout, track_running_stats=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for unit in self.units:
            out = unit(out)
        return F.max_pool2d(F.relu(out + self.shortcut(x)), 2)


class Backbone(nn.Module):
    """trunk blocks -> adapted blocks, each followed by its warp -> readout -> linear head."""

    def __init__(self, block: type[nn.Module], widths: list[int], head_in: int, ways: int,
                 adapted_blocks: int | None, warp: bool, film: bool, global_pool: bool) -> None:
        super().__init__()
        count = len(widths) - 1
        adapted = count if adapted_blocks is None else adapted_blocks
        if not 0 <= adapted <= count:
            raise ValueError(f"adapted_blocks = {adapted_blocks} must be between 0 and {count}")
        self.trunk_blocks = count - adapted
        self.blocks = nn.ModuleList(
            block(a, b, film and index >= self.trunk_blocks)
            for index, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self.warps = nn.ModuleDict({
            str(index): nn.Conv2d(widths[index + 1], widths[index + 1], 3, padding=1, bias=False)
            for index in range(self.trunk_blocks, count)
        }) if warp else None
        if self.warps is not None:
            for layer in self.warps.values():
                nn.init.dirac_(layer.weight)
        self.global_pool = global_pool
        self.head = nn.Linear(head_in, ways)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the blocks that the inner loop does not adapt."""
        for block in self.blocks[:self.trunk_blocks]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, from_trunk: bool = False,
                with_embedding: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of images `x`, or of the trunk's output `x` when `from_trunk`; `with_embedding`: (logits, the
        features the head reads)."""
        if not from_trunk:
            x = self.trunk(x)
        for index in range(self.trunk_blocks, len(self.blocks)):
            x = self.blocks[index](x)
            if self.warps is not None:
                x = self.warps[str(index)](x)
        embedding = x.mean(dim=(2, 3)) if self.global_pool else x.flatten(1)
        logits = self.head(embedding)
        return (logits, embedding) if with_embedding else logits


def conv4(in_shape: tuple[int, ...], ways: int, filters: int = 64, adapted_blocks: int | None = None,
          warp: bool = False, film: bool = False) -> Backbone:
    """Four blocks of `filters` channels (conv3x3, BN, ReLU, 2x2 max pooling); a linear head on the flat map."""
    side = in_shape[1] // 16
    return Backbone(ConvBlock, [in_shape[0]] + [filters] * 4, filters * side * side, ways,
                    adapted_blocks, warp, film, global_pool=False)


def resnet12(in_shape: tuple[int, ...], ways: int, filters: int = 64, adapted_blocks: int | None = None,
             warp: bool = False, film: bool = False) -> Backbone:
    """ResNet-12: four residual blocks of filters x (1, 2, 4, 8) channels (64-128-256-512, the reference's
    `AdaResNet`); global pooling, a linear head."""
    widths = [in_shape[0]] + [filters * m for m in (1, 2, 4, 8)]
    return Backbone(ResBlock, widths, widths[-1], ways, adapted_blocks, warp, film, global_pool=True)


def is_meta_only(name: str) -> bool:
    """Whether parameter `name` belongs to a warp or FiLM layer (learned in the outer loop only)."""
    return bool(set(name.split(".")) & set(META_ONLY_LAYERS))


def adapted_names(model: Backbone) -> list[str]:
    """Names of the parameters the inner loop adapts: the adapted blocks' and the head's, less warp and FiLM."""
    trunk = {f"blocks.{index}" for index in range(model.trunk_blocks)}
    return [n for n, _ in model.named_parameters()
            if not is_meta_only(n) and ".".join(n.split(".")[:2]) not in trunk]
