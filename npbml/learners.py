"""Meta-learners: one episode in, the query loss and accuracy after adaptation out.

`L2LLearner` runs MAML / Meta-SGD through learn2learn (`clone()`, `adapt()`); `NPBML` is a
functional inner loop (torch.func.functional_call over a dict of the adapted parameters) with
the meta-learned initialisation, warp layers, learned inner learning rates, task-adaptive loss
and FiLM each switchable. Training unrolls with a graph (second order unless `first_order`);
meta-validation/test adapts without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from npbml.backbones import adapted_names, build_backbone
from npbml.config import EpisodicConfig
from npbml.task_loss import TaskAdaptiveLoss
from tasks.episodes import Episode, import_learn2learn


def query_result(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()


class L2LLearner(nn.Module):
    """MAML or Meta-SGD via learn2learn, plain SGD inner steps on the support cross-entropy."""

    def __init__(self, backbone: nn.Module, method: str, lr: float, first_order: bool) -> None:
        super().__init__()
        l2l = import_learn2learn()
        algorithm = l2l.algorithms.MAML if method == "maml" else l2l.algorithms.MetaSGD
        self.algorithm = algorithm(backbone, lr=lr, first_order=first_order)

    def forward(self, episode: Episode, steps: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        learner = self.algorithm.clone()
        for _ in range(steps):
            loss = F.cross_entropy(learner(episode.support_x), episode.support_y)
            learner.adapt(loss, first_order=None if train else True)
        with torch.set_grad_enabled(train):
            return query_result(learner(episode.query_x), episode.query_y)

    def inner_lrs(self) -> torch.Tensor | None:
        lrs = getattr(self.algorithm, "lrs", None)
        return None if lrs is None else torch.cat([lr.detach().reshape(-1) for lr in lrs])


class NPBML(nn.Module):
    """Neural procedural bias meta-learning: initialisation, optimizer (warp) and loss meta-learned."""

    def __init__(self, backbone: nn.Module, config: EpisodicConfig) -> None:
        super().__init__()
        self.components, self.inner = config.components, config.inner
        self.backbone = backbone
        self.names = adapted_names(backbone)
        params = dict(backbone.named_parameters())
        if not self.components.learn_init:
            for name in self.names:
                params[name].requires_grad_(False)
        self.loss = TaskAdaptiveLoss(config.data.ways, self.components.film) if self.components.learned_loss \
            else None
        self.lrs = nn.ParameterList(
            nn.Parameter(torch.full_like(params[n], self.inner.lr)) for n in self.names
        ) if self.components.learned_inner_lr else None

    def support_loss(self, params: dict[str, torch.Tensor], episode: Episode,
                     transductive_x: torch.Tensor | None) -> torch.Tensor:
        logits = functional_call(self.backbone, params, (episode.support_x,))
        if self.loss is None:
            return F.cross_entropy(logits, episode.support_y)
        query_logits = functional_call(self.backbone, params, (transductive_x,))
        return self.loss(logits, episode.support_y, query_logits, list(params.values()))

    def transductive_x(self, episode: Episode) -> torch.Tensor:
        """The first `inner.transductive_shots` query examples of each class (the query is class-major)."""
        ways = int(episode.support_y.max()) + 1
        per_class = episode.query_x.reshape(ways, -1, *episode.query_x.shape[1:])
        return per_class[:, :self.inner.transductive_shots].reshape(-1, *episode.query_x.shape[1:])

    def adapt(self, episode: Episode, steps: int, create_graph: bool) -> dict[str, torch.Tensor]:
        """`steps` of SGD (momentum, Nesterov, weight decay as configured) from the initialisation.

        The update runs on all tensors at once (`torch._foreach_*`, differentiable), not tensor by tensor.
        """
        base = dict(self.backbone.named_parameters())
        params = [base[n] if base[n].requires_grad and create_graph else base[n].detach().requires_grad_()
                  for n in self.names]
        transductive_x = self.transductive_x(episode) if self.loss is not None else None
        momentum = self.inner.momentum
        buffers: list[torch.Tensor] | None = None
        for _ in range(steps):
            loss = self.support_loss(dict(zip(self.names, params, strict=True)), episode, transductive_x)
            step = list(torch.autograd.grad(loss, params, create_graph=create_graph and not self.inner.first_order))
            if self.inner.weight_decay:
                step = torch._foreach_add(step, params, alpha=self.inner.weight_decay)
            if momentum:
                buffers = step if buffers is None else torch._foreach_add(step, buffers, alpha=momentum)
                step = torch._foreach_add(step, buffers, alpha=momentum) if self.inner.nesterov else buffers
            params = torch._foreach_sub(params, torch._foreach_mul(step, list(self.lrs))) \
                if self.lrs is not None else torch._foreach_add(params, step, alpha=-self.inner.lr)
            if not create_graph:
                params = [p.detach().requires_grad_() for p in params]
                buffers = [b.detach() for b in buffers] if buffers is not None else None
        return dict(zip(self.names, params, strict=True))

    def forward(self, episode: Episode, steps: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            params = self.adapt(episode, steps, create_graph=train)
        with torch.set_grad_enabled(train):
            return query_result(functional_call(self.backbone, params, (episode.query_x,)), episode.query_y)

    def inner_lrs(self) -> torch.Tensor | None:
        return None if self.lrs is None else torch.cat([lr.detach().reshape(-1) for lr in self.lrs])


def build_learner(config: EpisodicConfig, in_shape: tuple[int, int, int]) -> nn.Module:
    """The meta-learner `config.method` names, on the configured backbone."""
    npbml = config.method == "npbml"
    backbone = build_backbone(
        config.model.backbone, in_shape, config.data.ways, config.model.filters,
        warp=npbml and config.components.warp, film=npbml and config.components.film,
    )
    if npbml:
        return NPBML(backbone, config)
    return L2LLearner(backbone, config.method, config.inner.lr, config.inner.first_order)
