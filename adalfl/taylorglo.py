"""TaylorGLO (Gonzalez & Miikkulainen, "Optimizing loss functions through multivariate Taylor polynomial
parameterization", GECCO 2021): a loss-learning baseline whose loss is a third-order Taylor polynomial of
(target y, prediction p), searched by CMA-ES on the validation error of short training runs.

The third-order expansion of f(y, p) around a centre (theta_0, theta_1) has 10 terms; the 4 that hold no
p (the constant, (y - theta_0), (y - theta_0)^2, (y - theta_0)^3) cannot change the gradient with respect
to the model's outputs and are dropped. What is left, with the paper's parameter numbering, is

    f(y, p) = theta_2 (p - theta_1) + 1/2 theta_3 (p - theta_1)^2 + 1/6 theta_4 (p - theta_1)^3
              + theta_5 (y - theta_0)(p - theta_1) + 1/2 theta_6 (y - theta_0)(p - theta_1)^2
              + 1/2 theta_7 (y - theta_0)^2 (p - theta_1),

8 parameters in all, and the loss is L = -mean over outputs and batch of f(y_i, p_i) (the paper's sign),
with p the softmax probability (classification) or the raw output (regression), as for AdaLFL's M_phi.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import cma
import numpy as np
import torch
from torch import nn

from adalfl.loss_network import OutputWiseLoss, Prediction
from engine.rng import OwnRandomState, numpy_state, set_numpy_state

NUM_PARAMETERS = 8
PENALTY = 1e6  # fitness of a candidate whose training diverged


class TaylorGLOLoss(OutputWiseLoss):
    """The TaylorGLO polynomial applied output-wise; `forward` and `predict` are OutputWiseLoss's."""

    def __init__(self, theta: Sequence[float], prediction: Prediction = "softmax") -> None:
        nn.Module.__init__(self)  # no loss network: the polynomial replaces it
        if len(theta) != NUM_PARAMETERS:
            raise ValueError(f"TaylorGLO takes {NUM_PARAMETERS} parameters, got {len(theta)}")
        self.prediction = prediction
        self.theta = nn.Parameter(torch.as_tensor(np.asarray(theta), dtype=torch.float32), requires_grad=False)

    def pointwise(
        self, target: torch.Tensor, prediction: torch.Tensor, log_prediction: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = self.theta.to(prediction.dtype)
        dy, dp = target.to(prediction.dtype) - t[0], prediction - t[1]
        f = (
            t[2] * dp + t[3] * dp**2 / 2 + t[4] * dp**3 / 6
            + t[5] * dy * dp + t[6] * dy * dp**2 / 2 + t[7] * dy**2 * dp / 2
        )
        return -f


class TaylorGLOSearch:
    """CMA-ES (the `cma` package) over the 8 parameters, one generation per `step`. CMA-ES draws from a NumPy
    state of its own (swapped in around `ask` and `tell`, so nothing else in the run draws from it), which makes
    the search a pure function of its seed and the fitnesses it was told: `state_dict` holds those fitnesses as
    plain numbers, and `load_state_dict` replays them, so a resumed run continues at the next generation."""

    def __init__(self, population: int, sigma: float, seed: int) -> None:
        options = {"popsize": population, "seed": seed + 1, "verbose": -9}  # cma reads seed 0 as "random"
        outer = numpy_state()
        self.es = cma.CMAEvolutionStrategy(np.zeros(NUM_PARAMETERS), sigma, options)  # seeds NumPy's global state
        self.random = OwnRandomState(numpy_state, set_numpy_state, numpy_state())
        set_numpy_state(outer)
        self.generation = 0
        self.best_theta: list[float] | None = None
        self.best_fitness = math.inf
        self.log: list[dict[str, Any]] = []
        self.told: list[list[float]] = []  # each generation's fitnesses, in the order CMA-ES asked

    def _ask(self) -> list[np.ndarray]:
        with self.random.active():
            return self.es.ask()

    def _tell(self, candidates: list[np.ndarray], fitness: list[float]) -> None:
        with self.random.active():
            self.es.tell(candidates, fitness)
        self.told.append(fitness)

    def step(self, fitness_of: Callable[[list[float]], float]) -> dict[str, Any]:
        """Ask a population, score each candidate (lower is better), tell CMA-ES; returns the generation's record."""
        candidates = self._ask()
        fitness = []
        for candidate in candidates:
            value = fitness_of([float(v) for v in candidate])
            fitness.append(value if math.isfinite(value) else PENALTY)
        self._tell(candidates, fitness)
        best = int(np.argmin(fitness))
        if fitness[best] < self.best_fitness:
            self.best_fitness, self.best_theta = fitness[best], [float(v) for v in candidates[best]]
        self.generation += 1
        record = {
            "generation": self.generation, "best": fitness[best], "median": float(np.median(fitness)),
            "best_so_far": self.best_fitness, "best_theta": self.best_theta,
        }
        self.log.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "best_theta": self.best_theta, "best_fitness": self.best_fitness,
                "log": self.log, "told": self.told}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the told fitnesses on this freshly made search (same population, sigma and seed)."""
        for fitness in state["told"]:
            self._tell(self._ask(), fitness)
        self.generation, self.best_theta, self.best_fitness = (state["generation"], state["best_theta"],
                                                               state["best_fitness"])
        self.log = state["log"]
