"""SparseLSR: label smoothing computed from the target's log-probability alone (thesis, chapter on EvoMAL).

Label smoothing with coefficient a over C classes targets q_y = 1 - a + a/C and a/C elsewhere. Its
non-target part, -(a/C) sum_{j != y} log p_j, is replaced by (C - 1) copies of its value at the uniform share
of the remaining mass, p_j = (1 - p_y)/(C - 1):

    SparseLSR = -(1 - a + a/C) log p_y - (a (C - 1)/C) log((1 - p_y)/(C - 1)),

with 1 - p_y clamped at 1e-7 and log p_y = z_y - logsumexp(z): no dense smoothed target. It equals dense label
smoothing wherever the non-target logits are uniform, and has the same minimiser p_y = 1 - a + a/C. The
authors' reference code writes "+" before the second term, which is minimised at p_y -> 1 (it sharpens
instead of smoothing); this is the "-" form (README, deviations).
"""

from __future__ import annotations

import math

import torch

CLAMP = 1e-7


def sparse_label_smoothing(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean SparseLSR over the batch of (B, C) logits and int64 class targets (B,)."""
    classes = logits.shape[-1]
    log_p = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
    rest = (1 - log_p.exp()).clamp_min(CLAMP)
    target_weight = 1 - smoothing + smoothing / classes
    other_weight = smoothing * (classes - 1) / classes
    return (-target_weight * log_p - other_weight * (rest.log() - math.log(classes - 1))).mean()
