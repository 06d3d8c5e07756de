"""The episodic meta-training config: one schema for MAML, Meta-SGD and NPBML (with its ablations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.errors import require
from engine.run_config import RunConfig
from tasks.fewshot_datasets import FEWSHOT_DATASETS
from tasks.models import BACKBONES

METHODS = ("maml", "metasgd", "npbml")
Method = Literal["maml", "metasgd", "npbml"]
BLOCKS = 4  # pooled blocks of both backbones
Dataset = Literal[tuple(FEWSHOT_DATASETS)]  # the registry's names, checked with the rest of the config


@dataclass
class DataConfig:
    """Episodes: `ways`-way `shots`-shot tasks with `query` query examples per class."""

    dataset: Dataset = "omniglot"
    root: str | None = None
    ways: int = 5
    shots: int = 1
    query: int = 15
    train_tasks: int = -1  # distinct meta-training tasks; -1 samples a fresh task every time


@dataclass
class ModelConfig:
    backbone: Literal[BACKBONES] = "conv4"  # the model registry's episodic backbones
    filters: int = 64  # conv4: every block; resnet12: the first block (x2, x4, x8 after)
    # NPBML: blocks (from the top) adapted in the inner loop, with warp and FiLM layers; the blocks
    # below are meta-learned but fixed in the inner loop. null: all four (maml / metasgd always adapt all).
    adapted_blocks: int | None = None


@dataclass
class InnerConfig:
    """The inner (adaptation) loop: SGD with optional momentum / Nesterov / weight decay for NPBML."""

    steps: int = 5
    eval_steps: int | None = None  # steps at meta-validation/test; null: same as `steps`
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    first_order: bool = False
    transductive_shots: int = 1  # query examples per class the transductive term L_Q sees each inner step


@dataclass
class OuterConfig:
    """The outer loop: Adam, cosine annealing over `iterations`, gradient-norm clipping."""

    lr: float = 0.001
    meta_batch: int = 4
    iterations: int = 60000
    grad_clip: float | None = None  # the reference clips nothing
    cosine: bool = True
    min_lr: float = 1e-5  # the reference's cosine floor
    loss_lr: float | None = None  # NPBML: the loss networks' outer lr (null: outer.lr); cosine-annealed alike
    # adapt a meta-batch's tasks as one vmapped computation (NPBML.forward_tasks) instead of task by task; MAML and
    # Meta-SGD then run on the same functional inner loop as NPBML with its components off (README, "Episodic
    # few-shot meta-training")
    vectorize_tasks: bool = False


@dataclass
class ComponentsConfig:
    """NPBML's meta-learned components, each switchable for ablations (ignored by maml / metasgd)."""

    learn_init: bool = True  # meta-learned initialisation (MAML) of the whole backbone, trunk included
    warp: bool = True  # warp (preconditioning) layers: the meta-learned optimizer
    learned_inner_lr: bool = False  # per-parameter inner learning rates (Meta-SGD) on top
    learned_loss: bool = True  # task-adaptive loss CE + L_S + L_Q + R
    film: bool = True  # FiLM in the adapted backbone blocks
    loss_film: bool = False  # FiLM in the loss networks too (commented out in the reference's loss network)
    # L_Q's network: "shared" with L_S (the reference calls its inductive network for L_Q) or its "own"
    loss_query_net: Literal["shared", "own"] = "shared"
    # The loss networks' initialisation: "small" (the reference's: weights N(0, 0.01), biases PyTorch's default),
    # "small_zero_bias" (zero biases too: the regulariser's ReLUs die early) or "zero_output" (PyTorch's default
    # init, output layer zero); npbml/task_loss.py and the README's episodic section.
    loss_init: Literal["small", "small_zero_bias", "zero_output"] = "small"
    # The head starts every task at zero instead of at a meta-learned initialisation: the reference's
    # permutation-invariant head (its shared starting row is never updated there); the README's episodic section.
    reset_head: bool = False
    # With learned_loss: which learned terms M has besides CE (support: L_S, query: L_Q, regulariser: R); without
    # "query" the inner loop sees no query examples.
    loss_terms: list[Literal["support", "query", "regulariser"]] = field(
        default_factory=lambda: ["support", "query", "regulariser"])


@dataclass
class EvalConfig:
    every: int = 500  # meta-validate every this many meta-iterations
    val_tasks: int = 600
    test_tasks: int = 600
    test_dataset: Dataset | None = None  # cross-domain: meta-test on this data set's test split instead


@dataclass
class PretrainConfig:
    """Backbone pre-training before meta-training, as the reference's `run_pretraining.py` does it (its NPBML
    runs: `pretrained_backbone: True`, 200,000 steps at batch 128): the backbone's blocks with a temporary head
    over every meta-training class, trained as an ordinary classifier on the meta-training split; the blocks with
    the best prototype accuracy on `val_tasks` meta-validation tasks, measured every `validate_every` steps, are
    the ones meta-training starts from. `steps: 0` skips it. `optimizer`, `lr`, `milestones` left null take the
    reference's for the backbone: 4-CONV Adam 1e-3 (x0.1 at 200,000), ResNet-12 SGD 0.1 with momentum and
    Nesterov (x0.1 at 80k, 100k, 110k, 120k). `augment`: on RGB data sets, the reference's RandomResizedCrop,
    ColorJitter(0.4, 0.4, 0.4) and horizontal flip (never on grayscale ones: none on Omniglot there)."""

    steps: int = 0
    batch_size: int = 128
    optimizer: Literal["adam", "sgd"] | None = None
    lr: float | None = None
    milestones: list[int] | None = None
    gamma: float = 0.1  # the lr factor at each milestone
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    weight_decay: float = 0.0005
    augment: bool = True
    validate_every: int = 500
    val_tasks: int = 600

    def __post_init__(self) -> None:
        require(self.steps >= 0, f"pretrain.steps = {self.steps} must be at least 0 (0 skips pre-training)")
        for key in ("batch_size", "validate_every", "val_tasks"):
            require(getattr(self, key) >= 1, f"pretrain.{key} = {getattr(self, key)} must be at least 1")
        require(self.lr is None or self.lr > 0, f"pretrain.lr = {self.lr} must be positive (or null)")
        require(self.milestones is None or all(m >= 1 for m in self.milestones),
                f"pretrain.milestones = {self.milestones} must be steps of at least 1 (or null)")


@dataclass
class LogConfig:
    every: int = 10  # TensorBoard scalars every this many meta-iterations
    checkpoint_every: int = 100
    progress: bool = True


@dataclass
class EpisodicConfig(RunConfig):
    method: Method
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = {
            "data.ways": self.data.ways, "data.shots": self.data.shots, "data.query": self.data.query,
            "inner.steps": self.inner.steps, "outer.meta_batch": self.outer.meta_batch,
            "outer.iterations": self.outer.iterations, "eval.every": self.eval.every,
            "eval.val_tasks": self.eval.val_tasks, "eval.test_tasks": self.eval.test_tasks,
            "log.every": self.log.every, "log.checkpoint_every": self.log.checkpoint_every,
            "model.filters": self.model.filters, "inner.transductive_shots": self.inner.transductive_shots,
        }
        for key, value in positive.items():
            require(value >= 1, f"{key} = {value} must be at least 1")
        require(self.data.ways >= 2, f"data.ways = {self.data.ways} must be at least 2")
        require(self.inner.eval_steps is None or self.inner.eval_steps >= 1,
                f"inner.eval_steps = {self.inner.eval_steps} must be at least 1 (or null)")
        require(self.method == "npbml" or not (self.inner.momentum or self.inner.nesterov or self.inner.weight_decay),
                f"method {self.method} adapts with plain SGD: set inner.momentum=0, inner.nesterov=false and "
                "inner.weight_decay=0 (they are NPBML inner-loop options)")
        blocks = self.model.adapted_blocks
        require(blocks is None or self.method == "npbml",
                f"model.adapted_blocks is an NPBML option; method {self.method} adapts every block: "
                "set model.adapted_blocks=null")
        require(blocks is None or 0 <= blocks <= BLOCKS,
                f"model.adapted_blocks = {blocks} must be between 0 and {BLOCKS} (or null)")
        require(not (blocks == 0 and self.method == "npbml" and self.components.warp),
                "model.adapted_blocks = 0 adapts only the head, and warp layers sit after adapted blocks: "
                "set components.warp=false or model.adapted_blocks >= 1")
        terms = self.components.loss_terms
        require(not self.components.learned_loss or (bool(terms) and len(set(terms)) == len(terms)),
                f"components.loss_terms = {terms} must name each learned term once, at least one of "
                "support, query, regulariser (components.learned_loss=false removes them all)")
        require(self.inner.transductive_shots <= self.data.query,
                f"inner.transductive_shots = {self.inner.transductive_shots} exceeds data.query = {self.data.query}")
        require(not self.inner.nesterov or bool(self.inner.momentum), "inner.nesterov = true needs inner.momentum > 0")
        require(self.outer.lr > 0 and self.inner.lr > 0, "inner.lr and outer.lr must be positive")

    @property
    def eval_steps(self) -> int:
        return self.inner.eval_steps or self.inner.steps
