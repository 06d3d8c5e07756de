"""FiLM: z -> (1 + gamma) * z + beta, gamma and beta a linear map of the task's pooled input."""

from __future__ import annotations

import torch
from torch import nn


class FiLM(nn.Module):
    """Feature-wise modulation conditioned on the task, initialised as the reference's: weights N(0, 0.01), biases
    PyTorch's default U(+-1/sqrt(cond_features)), so it starts near (not at) the identity.

    `condition` is one vector [cond_features] for the whole batch: the layer's input pooled over the
    examples (and spatial positions), as in the reference, so every example of a task gets the same
    modulation. `z` is [B, features, ...] and is modulated along dimension 1.
    """

    def __init__(self, cond_features: int, features: int) -> None:
        super().__init__()
        self.features = features
        self.map = nn.Linear(cond_features, 2 * features)
        nn.init.normal_(self.map.weight, 0.0, 0.01)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.map(condition).split(self.features, dim=-1)
        spatial = [1] * (z.dim() - 2)
        gamma, beta = gamma.reshape(-1, *spatial), beta.reshape(-1, *spatial)
        return torch.addcmul(beta, 1.0 + gamma, z)  # (1 + gamma) * z + beta in one pass over z
