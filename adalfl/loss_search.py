"""The offline loss searches, TaylorGLO (CMA-ES) and EvoMAL (genetic programming with a gradient local search),
behind one small protocol: a generation at a time, checkpointable, ending in the best loss found. Each scores a
candidate loss by a short run of a freshly initialised base model on the task (`SearchHost` gives it those)."""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
from torch import nn

from adalfl.config import SingleTaskConfig
from adalfl.evomal import Episode, Evaluation, EvoMALLoss, EvoMALSearch, improves_predictions, local_search
from adalfl.gp_expression import Expression
from adalfl.loss_network import OutputWiseLoss
from adalfl.online_step import Batch, LossFn, online_step
from adalfl.streams import EVOMAL_STREAM, INIT_META_STREAM, INIT_TRAIN_STREAM, SEARCH_INIT_STREAM
from adalfl.taylorglo import TaylorGLOLoss, TaylorGLOSearch
from engine.errors import NonFiniteError
from tasks.supervised import SupervisedTask


class SearchHost(Protocol):
    """What a search needs of the run it serves."""

    config: SingleTaskConfig
    device: torch.device
    amp: torch.dtype | None
    prediction: str
    metric: str
    task_loss: LossFn
    task: SupervisedTask

    def fresh_base(self, stream: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]: ...

    def batch(self, split: str, step: int, stream: int, whole: bool = False) -> Batch: ...

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...


def short_run_metric(host: SearchHost, loss: nn.Module, steps: int, stream: int) -> float:
    """Validation metric of a fresh base model (seeded by `stream`) after `steps` steps with `loss`; inf when the
    training was not finite."""
    model, optimizer, _ = host.fresh_base(stream)
    finite = torch.ones((), dtype=torch.bool, device=host.device)
    for k in range(steps):
        stats = online_step(model, loss, optimizer, host.batch("train", k, INIT_TRAIN_STREAM), host.task_loss,
                            amp=host.amp)
        finite = finite & stats.finite
    if not bool(finite):
        return math.inf
    value = host.evaluate(model, "val")[host.metric]
    return value if math.isfinite(value) else math.inf


class LossSearch(ABC):
    """A loss search run a generation at a time (`step`), checkpointable, with `best_loss()` once
    `generation == generations`; the generation count, best fitness, log and state are the search object's."""

    def __init__(self, host: SearchHost, search: TaylorGLOSearch | EvoMALSearch, generations: int) -> None:
        self.host, self.search, self.generations = host, search, generations

    @property
    def generation(self) -> int:
        return self.search.generation

    @property
    def best_fitness(self) -> float:
        return self.search.best_fitness

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.search.log

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.search.load_state_dict(state)

    @abstractmethod
    def step(self) -> dict[str, Any]:
        """One generation: score its candidates, record them in `log`; returns the generation's record."""

    @abstractmethod
    def best_loss(self) -> OutputWiseLoss:
        """The best loss found, frozen, on the host's device."""

    @abstractmethod
    def results(self) -> dict[str, Any]:
        """What results.json records of the best loss."""


class TaylorGLO(LossSearch):
    """TaylorGLO: CMA-ES over the Taylor-polynomial loss's parameters, each scored after `taylorglo.eval_steps`
    steps (a non-finite score counts as the search's penalty)."""

    def __init__(self, host: SearchHost) -> None:
        cfg = host.config.taylorglo
        super().__init__(host, TaylorGLOSearch(cfg.population, cfg.sigma, host.config.seed), cfg.generations)

    def _fitness(self, theta: list[float]) -> float:
        loss = TaylorGLOLoss(theta, self.host.prediction).to(self.host.device)
        stream = SEARCH_INIT_STREAM + self.search.generation
        return short_run_metric(self.host, loss, self.host.config.taylorglo.eval_steps, stream)

    def step(self) -> dict[str, Any]:
        return self.search.step(self._fitness)

    def best_loss(self) -> OutputWiseLoss:
        return TaylorGLOLoss(self.search.best_theta, self.host.prediction).to(self.host.device)

    def results(self) -> dict[str, Any]:
        return {"taylorglo_theta": self.search.best_theta}


class EvoMAL(LossSearch):
    """EvoMAL: each candidate expression passes the rejection test, has its edge weights tuned by a gradient local
    search, then is scored by the validation metric after `evomal.fitness_steps` steps of the same base model."""

    def __init__(self, host: SearchHost) -> None:
        cfg = host.config.evomal
        super().__init__(host, EvoMALSearch(cfg, host.config.seed), cfg.generations)

    @functools.cached_property
    def _rejection_sample(self) -> Batch:
        """The rejection test's data: the fitness model's initial outputs on the first training examples."""
        model, _, _ = self.host.fresh_base(EVOMAL_STREAM)
        size = min(self.host.config.evomal.rejection_examples, self.host.task.size("train"))
        inputs, targets = self.host.task.batch("train", torch.arange(size), device=self.host.device)
        with torch.no_grad():
            return model(inputs), targets

    def _local_search_episode(self, k: int) -> Episode:
        model, optimizer, _ = self.host.fresh_base(EVOMAL_STREAM + 1 + k)
        host = self.host
        return model, optimizer, host.batch("train", k, INIT_TRAIN_STREAM), host.batch("val", k, INIT_META_STREAM)

    def _fitness(self, tree: Expression) -> Evaluation:
        cfg, host = self.host.config.evomal, self.host
        loss = EvoMALLoss(tree, host.prediction).to(host.device)
        if not improves_predictions(loss, *self._rejection_sample, cfg.rejection_steps):
            return Evaluation(math.inf, loss.weights.tolist(), "rejected")
        finite = local_search(loss, cfg.local_search_steps, cfg.local_search_lr, self._local_search_episode,
                              host.task_loss)
        loss.requires_grad_(False)
        fitness = short_run_metric(host, loss, cfg.fitness_steps, EVOMAL_STREAM) if bool(finite) else math.inf
        return Evaluation(fitness, loss.weights.tolist(), "trained" if math.isfinite(fitness) else "diverged")

    def step(self) -> dict[str, Any]:
        return self.search.step(self._fitness)

    def best_loss(self) -> OutputWiseLoss:
        if not math.isfinite(self.search.best_fitness):
            raise NonFiniteError("every EvoMAL candidate was rejected or diverged; raise evomal.population or "
                                 "evomal.generations, or lower optimizer.lr (now "
                                 f"{self.host.config.optimizer.lr:g})")
        return self.search.best_loss(self.host.prediction).to(self.host.device)

    def results(self) -> dict[str, Any]:
        best = self.best_loss()
        return {"evomal_expression": best.formula(), "evomal_tree": str(best.tree)}


LOSS_SEARCHES: dict[str, type[LossSearch]] = {"taylorglo": TaylorGLO, "evomal": EvoMAL}  # by MethodSpec.search
