"""NPBML's task-adaptive learned loss M = CE(support) + L_S + L_Q + R, as the reference code builds it (its
`adalossnet.py`); any subset of the three learned terms can be chosen, for ablations.

- L_S (inductive), per support example: [logits (N), one-hot label (N), CE (1)].
- L_Q (transductive), per query example of the inner batch: [logits (N), y~ (N), CE(logits, y~) (1)], where
  y~_c = -||z - p_c||^2 is the raw negative squared distance of the example's embedding z (the backbone's features
  before the head) to class c's prototype p_c (the mean support embedding of c), and CE(logits, y~) is
  cross-entropy with y~ as its (unnormalised, negative) soft target, -sum_c y~_c log softmax(logits)_c. The
  reference runs L_Q through the inductive network (its transductive network is built but never called):
  `query_net: shared` (default) does the same, `own` gives L_Q a network of its own.
- R (regulariser): one row for the whole model, the statistics of every adapted tensor concatenated,
  [mean, std, ||p||_2, ||p||_2] per tensor (the reference computes its "L1" input with p=2 too), mean and
  (unbiased) std detached, so R's gradient flows through the norms only.

Each network is two hidden ReLU layers as wide as its input (2N + 1; 4 x the adapted tensors for R) and a smooth
leaky ReLU output (leak 0.25, smoothness 5). FiLM on the loss networks is commented out in the reference, so it is
off by default (`film=True` adds it, conditioned on the mean of each layer's input rows). Initialisation (`init`):
- "small", the reference's: weights N(0, 0.01), biases PyTorch's default U(+-1/sqrt(fan_in));
- "small_zero_bias": the same weights, zero biases;
- "zero_output": PyTorch's default init with a zero output layer.
Each term is the network's output minus its output at a zero input row: a constant of the loss parameters, so no
gradient of the inner loop (and so no meta-gradient) changes, while every logged term starts near 0 and a term
whose network no longer depends on its inputs (dead) reads exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalfl.loss_network import LossMLP, SmoothLeakyReLU
from tasks.film import FiLM

LEARNED_TERMS = ("support", "query", "regulariser")  # L_S, L_Q, R: the terms with a loss network
STATISTICS = 4  # R's inputs per adapted tensor


class FiLMLossMLP(LossMLP):
    """`LossMLP` with two hidden layers as wide as its input, optional FiLM after every linear layer and an output
    centred at zero."""

    def __init__(self, in_features: int, film: bool = False, init: str = "small", beta: float = 5.0,
                 gamma: float = 0.25) -> None:
        super().__init__(in_features, (in_features, in_features), nn.ReLU, SmoothLeakyReLU(beta, gamma),
                         init_std=None if init == "zero_output" else 0.01, zero_output=init == "zero_output")
        if init == "small_zero_bias":
            for layer in self.layers:
                nn.init.zeros_(layer.bias)
        self.films = nn.ModuleList(FiLM(layer.in_features, layer.out_features) for layer in self.layers) \
            if film else None

    def network(self, x: torch.Tensor) -> torch.Tensor:
        activations = [*self.activations, self.output_activation]
        for index, (layer, activation) in enumerate(zip(self.layers, activations, strict=True)):
            z = layer(x)
            if self.films is not None:
                z = self.films[index](z, x.mean(dim=0))
            x = activation(z)
        return x.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) - self.network(x.new_zeros(1, x.shape[-1]))


def one_hot(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows of `labels` (F.one_hot without its data-dependent range check, so it runs under vmap)."""
    return (labels[..., None] == torch.arange(ways, device=labels.device)).to(dtype)


def prototype_distances(support_embedding: torch.Tensor, support_y: torch.Tensor,
                        query_embedding: torch.Tensor, ways: int) -> torch.Tensor:
    """[queries, ways]: -||z - p_c||^2, p_c the mean support embedding of class c."""
    one_hot_y = one_hot(support_y, ways, support_embedding.dtype)
    prototypes = one_hot_y.t() @ support_embedding / one_hot_y.sum(0).clamp_min(1.0)[:, None]
    return -(query_embedding[:, None] - prototypes[None]).pow(2).sum(-1)


def parameter_statistics(params: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """[1, 4 * len(params)]: mean and unbiased std (both detached), then the L2 norm twice, of each tensor. The
    norm is sqrt(sum p^2 + eps), so an all-zero tensor (a batch norm's bias at the initialisation) has a finite
    second-order meta-gradient."""
    rows = []
    for p in params:
        std, mean = torch.std_mean(p.detach())
        norm = (p.pow(2).sum() + eps).sqrt()
        rows.append(torch.stack((mean, std, norm, norm)))
    return torch.cat(rows)[None]


class TaskAdaptiveLoss(nn.Module):
    """M = CE(support) + L_S + L_Q + R, or CE + the learned terms named in `learned`; `adapted_tensors` (the number
    of tensors the inner loop adapts) sets R's width."""

    def __init__(self, ways: int, adapted_tensors: int, film: bool = False, init: str = "small",
                 learned: Sequence[str] = LEARNED_TERMS, query_net: Literal["shared", "own"] = "shared") -> None:
        super().__init__()
        unknown = set(learned) - set(LEARNED_TERMS)
        if unknown or not learned:
            raise ValueError(f"learned terms {list(learned)}: name one or more of {', '.join(LEARNED_TERMS)}")
        self.ways = ways
        inductive = FiLMLossMLP(2 * ways + 1, film, init) if "support" in learned or query_net == "shared" else None
        self.support_net = inductive if "support" in learned else None
        self.query_net = None if "query" not in learned else \
            inductive if query_net == "shared" else FiLMLossMLP(2 * ways + 1, film, init)
        self.regulariser_net = FiLMLossMLP(STATISTICS * adapted_tensors, film, init) \
            if "regulariser" in learned else None
        self.left_out: frozenset[str] = frozenset()  # terms M leaves out (a test-time ablation; see leaving_out)

    @property
    def nets(self) -> dict[str, FiLMLossMLP]:
        """The learned terms' networks by term name (only the terms this loss has; a shared network twice)."""
        nets = {"support": self.support_net, "query": self.query_net, "regulariser": self.regulariser_net}
        return {name: net for name, net in nets.items() if net is not None}

    @property
    def transductive(self) -> bool:
        """Whether M reads query examples (L_Q): the inner loop then adds some to its batch."""
        return self.query_net is not None

    def terms(self, logits: torch.Tensor, embedding: torch.Tensor, support_y: torch.Tensor,
              params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms of M, each a scalar: "ce" and each learned term this loss has. `logits` and `embedding` are the
        inner batch's: the support examples first, then the transductive query examples."""
        support = len(support_y)
        support_logits, query_logits = logits[:support], logits[support:]
        ce = F.cross_entropy(support_logits, support_y, reduction="none")
        terms = {"ce": ce.mean()}
        if self.support_net is not None:
            support_in = torch.cat((support_logits, one_hot(support_y, self.ways, logits.dtype), ce[:, None]), dim=1)
            terms["support"] = self.support_net(support_in).mean()
        if self.query_net is not None:
            distances = prototype_distances(embedding[:support], support_y, embedding[support:], self.ways)
            soft_ce = -(distances * query_logits.log_softmax(dim=1)).sum(dim=1)
            terms["query"] = self.query_net(torch.cat((query_logits, distances, soft_ce[:, None]), dim=1)).mean()
        if self.regulariser_net is not None:
            terms["regulariser"] = self.regulariser_net(parameter_statistics(params)).mean()
        return terms

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor, support_y: torch.Tensor,
                params: Sequence[torch.Tensor]) -> torch.Tensor:
        terms = self.terms(logits, embedding, support_y, params)
        return sum(value for name, value in terms.items() if name not in self.left_out)
    @contextlib.contextmanager
    def leaving_out(self, *names: str) -> Iterator[None]:
        """Inside the block, M is the sum of the other terms (names from `terms`: ce and the learned ones)."""
        present = ("ce", *self.nets)
        unknown = set(names) - set(present)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}; this loss's terms are {', '.join(present)}")
        self.left_out = frozenset(names)
        try:
            yield
        finally:
            self.left_out = frozenset()

    @torch.no_grad()
    def support_curve(self, margins: torch.Tensor) -> torch.Tensor:
        """CE + L_S on one support example of class 0 whose logits are [m, 0, ..., 0], for each margin m:
        the learned inductive loss's shape (for TensorBoard; only with L_S)."""
        if self.support_net is None:
            raise ValueError("this loss has no learned support term (L_S) to draw")
        device = self.support_net.layers[0].weight.device
        logits = torch.zeros(len(margins), self.ways, device=device)
        logits[:, 0] = margins.to(device)
        y = torch.zeros(len(margins), dtype=torch.long, device=device)
        ce = F.cross_entropy(logits, y, reduction="none")
        inputs = torch.cat((logits, one_hot(y, self.ways, logits.dtype), ce[:, None]), dim=1)
        return (ce + torch.stack([self.support_net(row[None]) for row in inputs]).reshape(-1)).cpu()
