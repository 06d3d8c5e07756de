"""NPBML's task-adaptive learned loss M = CE(support) + L_S + L_Q + R, each term its own loss network (any
subset of the three learned terms can be chosen, for ablations).

- L_S (inductive), per support example: [logits (N), one-hot label (N), CE (1)].
- L_Q (transductive), per query example: [logits (N), similarity to each class (N), CE against the
  pseudo-label argmax (1)]. The similarity is a parameter-free substitute for the paper's
  pre-trained relation network: softmax over classes of the negative squared distance from the
  query's logits to each class prototype (the mean support logits of that class).
- R (regulariser), per adapted parameter tensor: [mean, std, L1 norm / numel, L2 norm / sqrt(numel)]
  (the norms scaled by the tensor size, so tensors of any size give inputs of the same scale).

Each network is AdaLFL's `LossMLP` (hidden 40, 40, ReLU; smooth leaky ReLU output) with FiLM on every layer,
conditioned on the mean of that layer's input rows (the task). Initialisation (`init`):
- "small", the reference's: weights N(0, 0.01), biases PyTorch's default U(+-1/sqrt(fan_in));
- "small_zero_bias": the same weights, zero biases (the second hidden layer's pre-activations then start within
  ~1e-3 of zero for every input, where a few outer steps can switch the layer off for every input: docs/results.md);
- "zero_output": PyTorch's default init with a zero output layer.
Each term is the network's output minus its output at a zero input row, a constant of the loss parameters that
changes no gradient of the inner loop; so every term starts near 0, M starts as cross-entropy, and a term whose
network no longer depends on its inputs (dead) reads exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adalfl.loss_network import LossMLP, SmoothLeakyReLU
from tasks.film import FiLM

LEARNED_TERMS = ("support", "query", "regulariser")  # L_S, L_Q, R: the terms with a loss network


class FiLMLossMLP(LossMLP):
    """`LossMLP` with optional FiLM after every linear layer and an output centred at zero."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (40, 40), film: bool = True,
                 init: str = "small", beta: float = 5.0, gamma: float = 0.25) -> None:
        super().__init__(in_features, hidden, nn.ReLU, SmoothLeakyReLU(beta, gamma),
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


def prototype_similarity(support_logits: torch.Tensor, support_y: torch.Tensor,
                         query_logits: torch.Tensor, ways: int) -> torch.Tensor:
    """softmax over classes of -||query - prototype||^2, prototypes the per-class mean support logits."""
    one_hot_y = one_hot(support_y, ways, support_logits.dtype)
    prototypes = one_hot_y.t() @ support_logits / one_hot_y.sum(0).clamp_min(1.0)[:, None]
    return (-(query_logits[:, None] - prototypes[None]).pow(2).sum(-1)).softmax(dim=-1)


def parameter_statistics(params: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """[len(params), 4]: mean, std, L1 norm / numel, L2 norm / sqrt(numel) of each tensor.

    Tensors of the same size are stacked and reduced together (a backbone has few distinct sizes), so
    the cost is a few ops per size rather than per tensor. The square roots get `eps` inside so that
    all-zero tensors (BN biases at init) have finite gradients.
    """
    by_size: dict[int, list[int]] = {}
    for index, p in enumerate(params):
        by_size.setdefault(p.numel(), []).append(index)
    rows, order = [], []
    for indices in by_size.values():
        x = torch.stack([params[i].reshape(-1) for i in indices])
        var, mean = torch.var_mean(x, dim=1, correction=0)
        rows.append(torch.stack((mean, var, x.abs().mean(dim=1), x.pow(2).mean(dim=1)), dim=1))
        order += indices
    mean, var, l1, sq = torch.cat(rows)[torch.tensor(order).argsort()].unbind(dim=1)
    return torch.stack((mean, (var + eps).sqrt(), l1, (sq + eps).sqrt()), dim=1)


class TaskAdaptiveLoss(nn.Module):
    """M(support, query, params) = CE(support) + L_S + L_Q + R, or CE + the learned terms named in `learned`."""

    def __init__(self, ways: int, film: bool = True, hidden: Sequence[int] = (40, 40), init: str = "small",
                 learned: Sequence[str] = LEARNED_TERMS) -> None:
        super().__init__()
        unknown = set(learned) - set(LEARNED_TERMS)
        if unknown or not learned:
            raise ValueError(f"learned terms {list(learned)}: name one or more of {', '.join(LEARNED_TERMS)}")
        self.ways = ways
        self.support_net = FiLMLossMLP(2 * ways + 1, hidden, film, init) if "support" in learned else None
        self.query_net = FiLMLossMLP(2 * ways + 1, hidden, film, init) if "query" in learned else None
        self.regulariser_net = FiLMLossMLP(4, hidden, film, init) if "regulariser" in learned else None
        self.left_out: frozenset[str] = frozenset()  # terms M leaves out (a test-time ablation; see leaving_out)

    @property
    def nets(self) -> dict[str, FiLMLossMLP]:
        """The learned terms' networks by term name (only the terms this loss has)."""
        nets = {"support": self.support_net, "query": self.query_net, "regulariser": self.regulariser_net}
        return {name: net for name, net in nets.items() if net is not None}

    @property
    def transductive(self) -> bool:
        """Whether M reads query examples (L_Q): the inner loop then adds some to its batch."""
        return self.query_net is not None

    def terms(self, support_logits: torch.Tensor, support_y: torch.Tensor, query_logits: torch.Tensor,
              params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms of M, each a scalar: "ce" and each learned term this loss has."""
        ce = F.cross_entropy(support_logits, support_y, reduction="none")
        terms = {"ce": ce.mean()}
        if self.support_net is not None:
            support_in = torch.cat((support_logits, one_hot(support_y, self.ways, support_logits.dtype),
                                    ce[:, None]), dim=1)
            terms["support"] = self.support_net(support_in).mean()
        if self.query_net is not None:
            similarity = prototype_similarity(support_logits, support_y, query_logits, self.ways)
            pseudo_ce = F.cross_entropy(query_logits, query_logits.argmax(dim=1), reduction="none")
            terms["query"] = self.query_net(torch.cat((query_logits, similarity, pseudo_ce[:, None]), dim=1)).mean()
        if self.regulariser_net is not None:
            terms["regulariser"] = self.regulariser_net(parameter_statistics(params)).mean()
        return terms

    def forward(self, support_logits: torch.Tensor, support_y: torch.Tensor, query_logits: torch.Tensor,
                params: Sequence[torch.Tensor]) -> torch.Tensor:
        terms = self.terms(support_logits, support_y, query_logits, params)
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
