"""FiLM: z -> (1 + gamma) * z + beta, gamma and beta a linear map of a pooled conditioning input."""

from __future__ import annotations

import torch
from torch import nn


class FiLM(nn.Module):
    """Feature-wise modulation; zero-initialised, so it starts as the identity.

    `condition` is [B, cond_features] (one row per example) or [cond_features] (one for all rows);
    `z` is [B, features, ...] and is modulated along dimension 1 (or the last dimension for a 1-D
    condition).
    """

    def __init__(self, cond_features: int, features: int) -> None:
        super().__init__()
        self.features = features
        self.map = nn.Linear(cond_features, 2 * features)
        nn.init.zeros_(self.map.weight)
        nn.init.zeros_(self.map.bias)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.map(condition).split(self.features, dim=-1)
        if condition.dim() == 2 and z.dim() > 2:
            shape = (*gamma.shape, *([1] * (z.dim() - 2)))
            gamma, beta = gamma.reshape(shape), beta.reshape(shape)
        return torch.addcmul(beta, 1.0 + gamma, z)  # (1 + gamma) * z + beta in one pass over z
