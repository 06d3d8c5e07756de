"""EvoMAL (Raymond, Chen, Xue, Zhang, "Learning Symbolic Model-Agnostic Loss Functions via Meta-Learning",
TPAMI 2023): genetic programming searches loss expressions l(y, f(x)) (adalfl/gp_expression.py); each new
candidate passes a rejection test, then the weights on its edges are tuned by a gradient local search (offline
one-step meta steps), and its fitness is the validation error (or MSE) of a fresh base model trained with it.

`EvoMALLoss` is a tree as a differentiable loss, `improves_predictions` the rejection test, `local_search` the
gradient half, and `EvoMALSearch` the population, one generation per `step`, picklable for checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from deap import algorithms, base, gp, tools
from torch import nn

from adalfl.config import EvoMALConfig
from adalfl.gp_expression import PREDICTION, PRIMITIVES, TARGET, Expression, formula, parse, repair, toolbox
from adalfl.loss_network import OutputWiseLoss, Prediction
from adalfl.online_step import Batch, LossFn, online_step
from engine.rng import OwnRandomState, rng_state, seed_everything, set_rng_state

REJECTION_LR = 0.01  # Adam on the sampled outputs in the rejection test
Episode = tuple[nn.Module, torch.optim.Optimizer, Batch, Batch]  # fresh model, its optimizer, train and val batch


class EvoMALLoss(OutputWiseLoss):
    """An expression tree as a loss: evaluated elementwise on (B, C) tensors (classification: softmax
    probabilities and one-hot targets; regression: the raw outputs and targets), summed over the C outputs and
    averaged over the batch, as the reference code does (not averaged over outputs like OutputWiseLoss).

    Every edge carries a learnable scalar weight (the value a node passes to its parent is scaled by it),
    initialised 1 + 0.001 N(0, 1) unless `weights` are given: `weights[i - 1]` belongs to node i of the tree.
    """

    def __init__(self, tree: gp.PrimitiveTree, prediction: Prediction = "softmax",
                 weights: Sequence[float] | None = None) -> None:
        nn.Module.__init__(self)  # no loss network: the expression replaces it
        self.prediction = prediction
        self.tree = gp.PrimitiveTree(tree)
        initial = 1 + 0.001 * torch.randn(len(tree) - 1) if weights is None else torch.tensor(weights)
        if initial.shape != (len(tree) - 1,):
            raise ValueError(f"a tree of {len(tree)} nodes has {len(tree) - 1} edge weights, got {len(initial)}")
        self.weights = nn.Parameter(initial.to(torch.float32))

    def pointwise(
        self, target: torch.Tensor, prediction: torch.Tensor, log_prediction: torch.Tensor | None = None
    ) -> torch.Tensor:
        """l(y, p) for tensors of equal shape, element by element (`log_prediction` is not used)."""
        weights = self.weights.to(prediction.dtype).unbind()
        leaves = {TARGET: target.to(prediction.dtype), PREDICTION: prediction}
        stack: list[torch.Tensor] = []
        for index in range(len(self.tree) - 1, -1, -1):  # prefix order read backwards: arguments come first
            node = self.tree[index]
            if node.arity == 0:
                value = leaves[node.value] if node.value in leaves else prediction.new_tensor(float(node.value))
            else:
                function = PRIMITIVES[node.name][0]
                value = function(*[stack.pop() for _ in range(node.arity)])
            stack.append(weights[index - 1] * value if index > 0 else value)
        return torch.broadcast_to(stack.pop(), prediction.shape)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = outputs.reshape(outputs.shape[0], -1)
        if self.prediction == "softmax":
            target = F.one_hot(target, outputs.shape[1])
        return self.pointwise(target.reshape(outputs.shape), self.predict(outputs)).sum(dim=1).mean()

    def formula(self) -> str:
        """The weighted expression as readable text."""
        return formula(self.tree, self.weights.tolist())


def prediction_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Error rate of the arg-max for class targets (integers), mean squared error otherwise."""
    if targets.dtype in (torch.int64, torch.int32):
        return (outputs.argmax(dim=1) != targets).float().mean()
    return F.mse_loss(outputs.reshape(targets.shape), targets)


def improves_predictions(loss: nn.Module, outputs: torch.Tensor, targets: torch.Tensor, steps: int) -> bool:
    """The rejection test: `loss` optimises `outputs` (a base model's logits or raw outputs) directly, by Adam
    (lr 0.01) for `steps` steps; True only if the outputs stay finite and their error strictly improves."""
    start = outputs.detach()
    free = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([free], lr=REJECTION_LR)
    for _ in range(steps):
        (free.grad,) = torch.autograd.grad(loss(free, targets), free)  # the loss's own weights get no gradient
        optimizer.step()
    with torch.no_grad():
        return bool(torch.isfinite(free).all() and prediction_error(free, targets) < prediction_error(start, targets))


def local_search(loss: EvoMALLoss, steps: int, lr: float, episode: Callable[[int], Episode],
                 task_loss: LossFn) -> torch.Tensor:
    """The gradient half of EvoMAL: `steps` Adam steps (learning rate `lr`) on the edge weights, step k taking one
    differentiable step of the fresh model and optimizer `episode(k)` returns on its training batch and scoring
    `task_loss` on its validation batch (the exact one-step meta-gradient of adalfl/online_step.py). Returns a
    device bool: every step was finite."""
    meta_optimizer = torch.optim.Adam(loss.parameters(), lr=lr)
    finite = torch.ones((), dtype=torch.bool, device=loss.weights.device)
    for k in range(steps):
        model, optimizer, batch, meta_batch = episode(k)
        stats = online_step(model, loss, optimizer, batch, task_loss, meta=(loss, meta_optimizer, meta_batch))
        finite = finite & stats.finite
    return finite


@dataclass
class Evaluation:
    """What one candidate expression scored."""

    fitness: float  # validation error or MSE; inf when rejected or when training was not finite
    weights: list[float]  # its edge weights after the local search
    outcome: Literal["rejected", "diverged", "trained"]


class EvoMALSearch:
    """The GP population, one generation per `step`. `state_dict` holds everything it needs as plain data (trees as
    DEAP's strings), so a checkpoint holds the whole search and a resumed run continues at the next generation: the
    population with its fitnesses, the hall of fame, the cache of evaluated expressions (keyed by their exact
    string) and its own Python/NumPy/torch random states, swapped in for every generation (so nothing else in the
    run draws from them)."""

    def __init__(self, config: EvoMALConfig, seed: int) -> None:
        self.config = config
        outer = rng_state()
        seed_everything(seed)
        self.random = OwnRandomState(rng_state, set_rng_state, rng_state())
        set_rng_state(outer)
        self.generation = 0
        self.cache: dict[str, Evaluation] = {}
        self.hall_of_fame = tools.HallOfFame(1)
        self.log: list[dict[str, Any]] = []
        with self.random.active():
            self.population = [self._toolbox().expression() for _ in range(config.population)]
            for tree in self.population:
                repair(tree)

    def _toolbox(self) -> base.Toolbox:
        cfg = self.config
        return toolbox((cfg.init_min_height, cfg.init_max_height), cfg.tournament, cfg.max_height)

    def _offspring(self) -> list[Expression]:
        """Tournament selection, then crossover, mutation or reproduction for each child (DEAP's varOr), repaired."""
        box, cfg = self._toolbox(), self.config
        offspring = algorithms.varOr(box.select(self.population, len(self.population)), box, len(self.population),
                                     cfg.crossover, cfg.mutation)
        for tree in offspring:
            repair(tree)
        return offspring

    def step(self, evaluate: Callable[[Expression], Evaluation]) -> dict[str, Any]:
        """Breed a generation (the first is the initial population), score each expression not in the cache
        (lower is better), update the hall of fame; returns the generation's record."""
        outcomes: Counter[str] = Counter()
        with self.random.active():
            if self.generation > 0:
                self.population = self._offspring()
            for tree in self.population:
                key = str(tree)
                if key in self.cache:
                    outcomes["cached"] += 1
                else:
                    self.cache[key] = evaluate(tree)
                    outcomes[self.cache[key].outcome] += 1
                tree.fitness.values = (self.cache[key].fitness,)
            self.hall_of_fame.update(self.population)
        self.generation += 1
        fitness = [tree.fitness.values[0] for tree in self.population]
        record = {
            "generation": self.generation, "best": min(fitness), "median": float(np.median(fitness)),
            "best_so_far": self.best_fitness, "best_tree": str(self.hall_of_fame[0]),
            **{key: outcomes[key] for key in ("trained", "rejected", "diverged", "cached")},
        }
        self.log.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        def tree(expression: Expression) -> tuple[str, float | None]:
            return str(expression), expression.fitness.values[0] if expression.fitness.valid else None

        return {"generation": self.generation, "population": [tree(t) for t in self.population],
                "hall_of_fame": [tree(t) for t in self.hall_of_fame], "log": self.log, "rng": self.random.state,
                "cache": {key: dataclasses.asdict(value) for key, value in self.cache.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def tree(text: str, fitness: float | None) -> Expression:
            expression = parse(text)
            if fitness is not None:
                expression.fitness.values = (fitness,)
            return expression

        self.generation, self.log, self.random.state = state["generation"], state["log"], state["rng"]
        self.population = [tree(*entry) for entry in state["population"]]
        self.hall_of_fame = tools.HallOfFame(1)
        for entry in state["hall_of_fame"]:
            self.hall_of_fame.insert(tree(*entry))
        self.cache = {key: Evaluation(**value) for key, value in state["cache"].items()}

    @property
    def best_fitness(self) -> float:
        return self.hall_of_fame[0].fitness.values[0] if len(self.hall_of_fame) else math.inf

    def best_loss(self, prediction: Prediction) -> EvoMALLoss:
        """The best expression found, with its local-searched edge weights, frozen."""
        best = self.hall_of_fame[0]
        return EvoMALLoss(best, prediction, self.cache[str(best)].weights).requires_grad_(False)
