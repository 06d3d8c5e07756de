"""Batch norm that `torch.func.vmap` differentiates correctly, for adapting a meta-batch's tasks at once.

The backbones normalise with each batch's statistics (no running buffers, as in MAML). Under vmap, PyTorch's
fused batch-norm kernel gives a wrong second-order meta-gradient once the inner loop adapts the norm's parameters
per task (measured in PyTorch 2.14; tests/test_vectorized_tasks.py keeps a check that fails once it is fixed).
The same normalisation is a group norm with one group per channel over the batch moved into the spatial
positions: `VmapSafeBatchNorm2d` computes it so, and vmap batches group norm's derivatives correctly (on the CPU
in 0.5-0.7x the time of the normalisation written out with `torch.var_mean`; docs/benchmarks.md).
`with_vmap_safe_batch_norm` swaps it into a built module, sharing the norm's parameters, so state dicts and
checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VmapSafeBatchNorm2d(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, the statistics over the batch and positions of each channel."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        by_channel = x.transpose(0, 1).reshape(1, channels, batch * height * width)
        normed = F.group_norm(by_channel, channels, self.weight, self.bias, self.eps)
        return normed.reshape(channels, batch, height, width).transpose(0, 1)


def with_vmap_safe_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with every batch-statistics BatchNorm2d replaced, in place, by `VmapSafeBatchNorm2d`."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            if child.track_running_stats or not child.affine:
                raise ValueError(f"{name}: only affine batch norm with batch statistics is replaced here")
            setattr(model, name, VmapSafeBatchNorm2d(child.weight, child.bias, child.eps))
        else:
            with_vmap_safe_batch_norm(child)
    return model
