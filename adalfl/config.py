"""The single-task experiment config: one model trained on one task with a handcrafted or learned loss.

Defaults are the AdaLFL paper's CIFAR-10 protocol (see README, "AdaLFL: the defaults and why").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from adalfl.methods import METHOD_SPECS
from engine.errors import require
from engine.run_config import RunConfig
from tasks.models import SINGLE_TASK_MODELS

Method = Literal[tuple(METHOD_SPECS)]  # adalfl/methods.py: what each method is
METHODS: tuple[str, ...] = get_args(Method)


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str | None = None  # else --data-root, $META_DATA_ROOT, ./data
    val_fraction: float = 0.1  # stratified share of the training set held out for validation
    augment: bool = True  # random crop + flip on the training split of image sets

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 1.0, f"data.val_fraction = {self.val_fraction} must lie in (0, 1)")


@dataclass
class ModelConfig:
    name: str = "resnet18"

    def __post_init__(self) -> None:
        near = difflib.get_close_matches(self.name, SINGLE_TASK_MODELS, n=1)
        require(self.name in SINGLE_TASK_MODELS, f"model.name = {self.name!r} is not valid"
                f"{f' (did you mean {near[0]!r}?)' if near else ''}; choose one of: {', '.join(SINGLE_TASK_MODELS)}")


@dataclass
class OptimizerConfig:
    """The base optimizer (torch.optim.SGD, Adam, AdamW or RMSprop) and its MultiStep learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = True  # sgd
    weight_decay: float = 5e-4  # L2 in the gradient; adamw: decoupled
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw, rmsprop
    alpha: float = 0.99  # rmsprop's smoothing constant
    milestones: list[int] = field(default_factory=lambda: [100_000, 135_000])
    lr_decay: float = 0.1
    # a finished run (folder or results.json): multiply the lr by its learned loss's gradient-norm ratios
    lr_multipliers_from: str | None = None

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optimizer.lr = {self.lr} must be positive")
        require(0 <= self.momentum < 1, f"optimizer.momentum = {self.momentum} must lie in [0, 1)")
        require(not self.nesterov or self.name == "sgd",
                f"optimizer.nesterov is an sgd setting; set optimizer.nesterov=false for {self.name}")
        require(not self.nesterov or self.momentum > 0, "optimizer.nesterov needs optimizer.momentum > 0")
        require(self.momentum == 0 or self.name in ("sgd", "rmsprop"),
                f"optimizer.momentum = {self.momentum} is not a setting of {self.name} (its momentum is "
                "optimizer.betas); set optimizer.momentum=0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optimizer.betas = {self.betas} must be two values in [0, 1)")
        require(self.eps > 0, f"optimizer.eps = {self.eps} must be positive")
        require(0 < self.alpha < 1, f"optimizer.alpha = {self.alpha} must lie in (0, 1)")

    def build(self, params: Any) -> torch.optim.Optimizer:
        """The torch.optim optimizer these settings describe, over `params`."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        if self.name == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, alpha=self.alpha, eps=self.eps, momentum=self.momentum,
                                       weight_decay=self.weight_decay)
        kind = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return kind(params, lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)


@dataclass
class TrainConfig:
    steps: int = 150_000  # base-model gradient steps of the whole run
    batch_size: int = 128
    eval_every: int = 2_000  # validation and test metrics
    eval_batch_size: int = 1_000
    checkpoint_every: int = 1_000
    sync_batchnorm: bool = False  # under torchrun on CUDA: batch norm over the global batch (nn.SyncBatchNorm)
    # GPU fast path (README, "On a GPU: the fast path and the run's true cost"): auto is on for CUDA, off on the CPU,
    # except amp for the methods that learn the loss (autocast_dtype).
    amp: Literal["auto", "bf16", "off"] = "auto"  # bf16 autocast of the model's forward passes
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format for image models and batches
    compile: bool = False  # torch.compile of the model (methods without the unrolled step; others run eagerly)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "checkpoint_every"):
            require(getattr(self, key) >= 1, f"train.{key} = {getattr(self, key)} must be at least 1")

    def autocast_dtype(self, cuda: bool, learns_loss: bool) -> torch.dtype | None:
        """bf16 when `amp` is bf16; under auto, on CUDA for the methods that do not learn the loss (for AdaLFL's
        steps, which ML3 runs too, bf16 measured slower and less exact: docs/benchmarks.md, "On one GPU")."""
        return torch.bfloat16 if self.amp == "bf16" or (self.amp == "auto" and cuda and not learns_loss) else None


@dataclass
class LossNetworkConfig:
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    beta: float = 2.0  # smooth leaky ReLU sharpness
    gamma: float = 0.25  # smooth leaky ReLU negative slope


@dataclass
class MetaConfig:
    """How the loss network is learned (ml3, adalfl); README, "AdaLFL: the defaults and why"."""

    lr: float = 1e-3  # Adam on the loss network
    init_steps: int = 300  # phase 1 (offline initialisation) meta steps (the paper: 2,500; README)
    reset_period: int = 1  # phase 1 re-initialises the base model every this many meta steps
    # where meta batches come from: the validation split, another training batch, or the step's own batch
    batch_source: Literal["validation", "train", "same"] = "same"
    loss_form: Literal["network", "residual"] = "residual"  # residual: task loss + network starting at zero
    # bound on the step's output-gradient norm over the task loss's; auto: 2.0 for adalfl, none for ml3 (as published)
    max_grad_ratio: float | None | Literal["auto"] = "auto"
    # bound: the step's output-gradient norm is at most max_grad_ratio times the task loss's; match: exactly that
    grad_scale: Literal["bound", "match"] = "bound"
    clip_grad_norm: float | None = None  # clip the meta-gradient's norm
    # adalfl: update the loss at every k-th step, plain steps with the current loss between (README, "Where AdaLFL
    # stands": k = 16 kept the every-step form's result at about 40 % of its cost)
    update_every: int = 16
    # adalfl, ml3: an update step's forward-mode product takes its layers' outputs from the real forward (faster;
    # false computes them again, holding less memory during the meta forward and backward)
    keep_outputs: bool = True

    def __post_init__(self) -> None:
        require(self.lr > 0, f"meta.lr = {self.lr} must be positive")
        require(self.init_steps >= 0, f"meta.init_steps = {self.init_steps} must be at least 0")
        require(self.reset_period >= 1, f"meta.reset_period = {self.reset_period} must be at least 1")
        for key in ("max_grad_ratio", "clip_grad_norm"):
            value = getattr(self, key)
            require(value in (None, "auto") or value > 0, f"meta.{key} = {value} must be positive (or null for none)")
        require(self.update_every >= 1, f"meta.update_every = {self.update_every} must be at least 1")
        require(self.grad_scale == "bound" or self.max_grad_ratio is not None,
                "meta.grad_scale = match sets the step's scale to meta.max_grad_ratio times the task loss's: "
                "set meta.max_grad_ratio (1.0 keeps the task loss's scale)")


    def grad_ratio(self, method: str) -> float | None:
        """The step's gradient-norm bound for `method`: max_grad_ratio, with auto resolved (adalfl 2.0, ml3 none)."""
        if self.max_grad_ratio == "auto":
            return None if method == "ml3" and self.grad_scale == "bound" else 2.0
        return self.max_grad_ratio


@dataclass
class TaylorGLOConfig:
    """The CMA-ES search of TaylorGLO's 8 loss parameters (adalfl/taylorglo.py) on validation error.

    Each candidate trains a freshly initialised base model for `eval_steps` steps with its loss and is
    scored by the validation metric; the best candidate's loss then trains the final model.
    """

    population: int = 28  # CMA-ES popsize (TaylorGLO paper)
    generations: int = 50
    sigma: float = 1.2  # CMA-ES initial step size around the all-zero start
    eval_steps: int = 2_000  # base steps of each candidate's short training run

    def __post_init__(self) -> None:
        for key in ("population", "generations", "eval_steps"):
            require(getattr(self, key) >= 1, f"taylorglo.{key} = {getattr(self, key)} must be at least 1")
        require(self.population >= 2, f"taylorglo.population = {self.population} must be at least 2")
        require(self.sigma > 0, f"taylorglo.sigma = {self.sigma} must be positive")


@dataclass
class EvoMALConfig:
    """EvoMAL's search (adalfl/evomal.py): genetic programming over loss expressions l(y, f(x)), each new candidate
    rejection-tested, its edge weights tuned by `local_search_steps` offline meta steps, and scored by the validation
    metric of a fresh base model trained `fitness_steps` steps with it. Defaults: the reference code's settings."""

    population: int = 25
    generations: int = 50
    crossover: float = 0.7  # one-point crossover
    mutation: float = 0.25  # uniform subtree mutation; reproduction takes the rest
    tournament: int = 4  # tournament size of the selection
    max_height: int = 10  # an over-height child is replaced by its parent
    init_min_height: int = 2  # ramped half-and-half initialisation
    init_max_height: int = 4
    local_search_steps: int = 250  # offline meta steps of the edge weights per candidate (0: no local search)
    local_search_lr: float = 1e-3  # Adam on the edge weights
    fitness_steps: int = 500  # base steps of each candidate's scored training run
    rejection_steps: int = 100  # Adam steps on the sampled outputs in the rejection test (reference: 1,000 off MNIST)
    rejection_examples: int = 100  # training examples whose outputs the rejection test optimises

    def __post_init__(self) -> None:
        require(self.population >= 2, f"evomal.population = {self.population} must be at least 2")
        for key in ("generations", "tournament", "fitness_steps", "rejection_steps", "rejection_examples"):
            require(getattr(self, key) >= 1, f"evomal.{key} = {getattr(self, key)} must be at least 1")
        require(self.local_search_steps >= 0, f"evomal.local_search_steps = {self.local_search_steps} must be at "
                "least 0")
        require(self.local_search_lr > 0, f"evomal.local_search_lr = {self.local_search_lr} must be positive")
        require(0 <= self.init_min_height <= self.init_max_height <= self.max_height,
                f"evomal heights must satisfy 0 <= init_min_height ({self.init_min_height}) <= init_max_height "
                f"({self.init_max_height}) <= max_height ({self.max_height})")
        require(self.crossover >= 0 and self.mutation >= 0 and self.crossover + self.mutation <= 1,
                f"evomal.crossover ({self.crossover}) and evomal.mutation ({self.mutation}) must be non-negative "
                "and sum to at most 1 (reproduction takes the rest)")


@dataclass
class LogConfig:
    scalars_every: int = 50
    loss_shape_every: int = 1_000  # learned-loss curves l(y, p) as a TensorBoard figure


@dataclass
class SingleTaskConfig(RunConfig):
    method: Method
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss_network: LossNetworkConfig = field(default_factory=LossNetworkConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    taylorglo: TaylorGLOConfig = field(default_factory=TaylorGLOConfig)
    evomal: EvoMALConfig = field(default_factory=EvoMALConfig)
    label_smoothing: float = 0.1  # label_smoothing, sparse_lsr: weight of the uniform distribution in the targets
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.label_smoothing < 1.0, f"label_smoothing = {self.label_smoothing} must lie in [0, 1)")
