"""Meta-learners: one episode in, the query loss and accuracy after adaptation out.

`L2LLearner` runs MAML / Meta-SGD through learn2learn (`clone()`, `adapt()`). `ComponentLearner` runs NPBML, and
MAML / Meta-SGD under `outer.vectorize_tasks` (with only their own components on): a functional inner loop
(torch.func.functional_call over a dict of the adapted parameters) with
the meta-learned initialisation, warp layers, learned inner learning rates, task-adaptive loss
and FiLM each switchable; the backbone's trunk (the blocks the inner loop does not adapt) runs once
per episode. Training unrolls with a graph (second order unless `first_order`);
meta-validation/test adapts without one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from npbml.batch_norm import with_vmap_safe_batch_norm
from npbml.config import ComponentsConfig, EpisodicConfig
from npbml.task_loss import TaskAdaptiveLoss
from tasks.backbones import Backbone, adapted_names, is_meta_only
from tasks.episodes import Episode
from tasks.learn2learn_import import import_learn2learn
from tasks.models import build_model


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


class EpisodeFeatures(NamedTuple):
    """The trunk's output on an episode's inner-loop batch (the support, then with L_Q the transductive query
    examples: one batch, so batch norm sees them together, as in the reference) and on its query."""

    inner: torch.Tensor
    query: torch.Tensor


class ComponentLearner(nn.Module):
    """A functional inner loop whose meta-learned components are switched on by `config.components`: all of them
    (initialisation, optimizer as warp layers and inner learning rates, task-adaptive loss, FiLM) is NPBML; the
    initialisation alone is MAML, with learned inner learning rates Meta-SGD."""

    def __init__(self, backbone: Backbone, config: EpisodicConfig) -> None:
        super().__init__()
        self.components, self.inner, self.ways = config.components, config.inner, config.data.ways
        self.backbone = backbone
        self.names = adapted_names(backbone)
        params = dict(backbone.named_parameters())
        for name, param in params.items():
            if (not self.components.learn_init and not is_meta_only(name)) or self.resets(name):
                param.requires_grad_(False)
        self.loss = TaskAdaptiveLoss(
            config.data.ways, len(self.names), film=self.components.loss_film, init=self.components.loss_init,
            learned=self.components.loss_terms, query_net=self.components.loss_query_net,
        ) if self.components.learned_loss else None
        self.lrs = nn.ParameterList(
            nn.Parameter(torch.full_like(params[n], self.inner.lr)) for n in self.names
        ) if self.components.learned_inner_lr else None

    def resets(self, name: str) -> bool:
        """Whether parameter `name` starts every task at zero (the head, with `components.reset_head`)."""
        return self.components.reset_head and name.startswith("head.")

    def task_start(self) -> dict[str, torch.Tensor]:
        """The adapted parameters at the start of every task: the (meta-learned) initialisation, the head at zero
        with `components.reset_head`."""
        base = dict(self.backbone.named_parameters())
        return {n: torch.zeros_like(base[n]) if self.resets(n) else base[n] for n in self.names}

    def logits(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """The backbone's logits on trunk `features` with the adapted parameters `params`."""
        return functional_call(self.backbone, params, (features, True))

    def inner_loss(self, params: dict[str, torch.Tensor], support_y: torch.Tensor,
                   inner_features: torch.Tensor) -> torch.Tensor:
        """The loss the inner loop descends: cross-entropy on the support, or the task-adaptive loss."""
        if self.loss is None:
            return F.cross_entropy(self.logits(params, inner_features), support_y)
        logits, embedding = functional_call(self.backbone, params, (inner_features, True, True))
        return self.loss(logits, embedding, support_y, list(params.values()))

    def transductive_x(self, query_x: torch.Tensor) -> torch.Tensor:
        """The first `inner.transductive_shots` query examples of each class (the query is class-major)."""
        per_class = query_x.reshape(self.ways, -1, *query_x.shape[1:])
        return per_class[:, :self.inner.transductive_shots].reshape(-1, *query_x.shape[1:])

    def inner_x(self, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """The inner loop's batch: the support, followed by the transductive query examples when L_Q is on."""
        if self.loss is None or not self.loss.transductive:
            return support_x
        return torch.cat((support_x, self.transductive_x(query_x)))

    def features(self, episode: Episode, train: bool) -> EpisodeFeatures:
        """The trunk's output, fixed in the inner loop, so computed once per episode (with a graph to the
        trunk's parameters when training)."""
        with torch.set_grad_enabled(train):
            return EpisodeFeatures(self.backbone.trunk(self.inner_x(episode.support_x, episode.query_x)),
                                   self.backbone.trunk(episode.query_x))

    def adapt(self, episode: Episode, steps: int, create_graph: bool,
              features: EpisodeFeatures | None = None) -> dict[str, torch.Tensor]:
        """`steps` of SGD (momentum, Nesterov, weight decay as configured) from the initialisation.

        The update runs on all tensors at once (`torch._foreach_*`, differentiable), not tensor by tensor.
        """
        if features is None:
            features = self.features(episode, train=create_graph)
        params = [p if p.requires_grad and create_graph else p.detach().requires_grad_()
                  for p in self.task_start().values()]
        buffers: list[torch.Tensor] | None = None
        for _ in range(steps):
            loss = self.inner_loss(dict(zip(self.names, params, strict=True)), episode.support_y, features.inner)
            grads = list(torch.autograd.grad(loss, params, create_graph=create_graph and not self.inner.first_order))
            params, buffers = self.inner_update(params, grads, buffers)
            if not create_graph:
                params = [p.detach().requires_grad_() for p in params]
                buffers = [b.detach() for b in buffers] if buffers is not None else None
        return dict(zip(self.names, params, strict=True))

    def inner_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor] | None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """One inner SGD step on all adapted tensors at once (`torch._foreach_*`, differentiable): weight decay,
        momentum, Nesterov, then the fixed or the learned (Meta-SGD) learning rates. Returns (params, buffers)."""
        step, momentum = grads, self.inner.momentum
        if self.inner.weight_decay:
            step = torch._foreach_add(step, params, alpha=self.inner.weight_decay)
        if momentum:
            buffers = step if buffers is None else torch._foreach_add(step, buffers, alpha=momentum)
            step = torch._foreach_add(step, buffers, alpha=momentum) if self.inner.nesterov else buffers
        params = torch._foreach_sub(params, torch._foreach_mul(step, list(self.lrs))) \
            if self.lrs is not None else torch._foreach_add(params, step, alpha=-self.inner.lr)
        return params, buffers

    def forward(self, episode: Episode, steps: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(episode, train)
        with torch.enable_grad():
            params = self.adapt(episode, steps, create_graph=train, features=features)
        with torch.set_grad_enabled(train):
            return query_result(self.logits(params, features.query), episode.query_y)

    def forward_tasks(self, episodes: list[Episode], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-training's forward of a whole meta-batch as one batched computation: each task's query loss and
        accuracy after `steps` inner steps, both [tasks], with the meta-gradient's graph. The per-task gradient
        is `torch.func.vmap` of `torch.func.grad` over the tasks; the update runs on the stacked parameters. The
        same values and meta-gradient as `forward` task by task, given the adapted blocks' vmap-safe batch norm
        (npbml/batch_norm.py); every task's graph is held at once until the backward pass."""
        support_y, query_y = torch.stack([e.support_y for e in episodes]), torch.stack([e.query_y for e in episodes])
        features = EpisodeFeatures(*(torch.stack(field) for field in zip(*(self.features(e, train=True)
                                                                             for e in episodes), strict=True)))
        params = [p.expand(len(episodes), *p.shape) for p in self.task_start().values()]
        task_grads = torch.func.vmap(torch.func.grad(
            lambda ps, y, inner: self.inner_loss(dict(zip(self.names, ps, strict=True)), y, inner)))
        buffers: list[torch.Tensor] | None = None
        for _ in range(steps):
            with torch.set_grad_enabled(not self.inner.first_order):  # first order: no graph through the gradient
                grads = list(task_grads(params, support_y, features.inner))
            params, buffers = self.inner_update(params, grads, buffers)
        logits = torch.func.vmap(self.logits)(dict(zip(self.names, params, strict=True)), features.query)
        return torch.func.vmap(query_result)(logits, query_y)

    def inner_lrs(self) -> torch.Tensor | None:
        return None if self.lrs is None else torch.cat([lr.detach().reshape(-1) for lr in self.lrs])

    def loss_terms(self, episode: Episode) -> dict[str, dict[str, float]]:
        """The task-adaptive loss's terms (CE, L_S, L_Q, R) at the initialisation on `episode`, for TensorBoard:
        {"value": each term, "grad_norm": the norm of its gradient in the adapted parameters (what the inner loop
        feels of it)}."""
        features = self.features(episode, train=False)
        params = {n: p.detach().requires_grad_() for n, p in self.task_start().items()}  # for logging only
        logits, embedding = functional_call(self.backbone, params, (features.inner, True, True))
        terms = self.loss.terms(logits, embedding, episode.support_y, list(params.values()))
        norms = [torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            term, list(params.values()), retain_graph=True, allow_unused=True, materialize_grads=True)]))
            for term in terms.values()]
        return {"value": dict(zip(terms, torch.stack(list(terms.values())).tolist(), strict=True)),
                "grad_norm": dict(zip(terms, torch.stack(norms).tolist(), strict=True))}

    def loss_meta_gradient_norms(self) -> dict[str, float]:
        """The norm of the current meta-gradient of each learned term's network (after a backward)."""
        nets = self.loss.nets
        norms = {name: torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in net.parameters()
                                                            if p.grad is not None] or [torch.zeros(1)]))
                 for name, net in nets.items()}
        return dict(zip(norms, torch.stack(list(norms.values())).tolist(), strict=True))


def build_learner(config: EpisodicConfig, in_shape: tuple[int, int, int]) -> nn.Module:
    """The meta-learner `config.method` names, on the configured backbone. With `outer.vectorize_tasks` the
    adapted blocks' batch norm is the vmap-safe one, and MAML / Meta-SGD are the functional learner with only the
    initialisation (and the per-parameter learning rates) meta-learned."""
    npbml = config.method == "npbml"
    backbone = build_model(
        config.model.backbone, in_shape, config.data.ways, filters=config.model.filters,
        adapted_blocks=config.model.adapted_blocks, warp=npbml and config.components.warp,
        film=npbml and config.components.film,
    )
    if not config.outer.vectorize_tasks:
        return ComponentLearner(backbone, config) if npbml else \
            L2LLearner(backbone, config.method, config.inner.lr, config.inner.first_order)
    for block in backbone.blocks[backbone.trunk_blocks:]:  # the adapted norms (npbml/batch_norm.py)
        with_vmap_safe_batch_norm(block)
    if npbml:
        return ComponentLearner(backbone, config)
    components = ComponentsConfig(learn_init=True, warp=False, learned_inner_lr=config.method == "metasgd",
                                  learned_loss=False, film=False)
    return ComponentLearner(backbone, dataclasses.replace(config, components=components))
