"""EvoMAL's genetic-programming representation (DEAP): loss expressions over the target y and the prediction
f(x) (named `fx` in expressions), as the reference code (Decadz/Evolved-Model-Agnostic-Loss) defines them.

Primitives (12): add, sub, mul, the analytic quotient aq(a, b) = a / sqrt(1 + b^2) (never divides by zero),
elementwise min and max; sign, square, abs, the protected log(max(|x|, 1e-7)) and sqrt(max(|x|, 1e-7)), tanh.
Terminals: y, fx and the constants +1 and -1 (a terminal's `value` is its symbol: "y", "fx", 1 or -1).
Variation is DEAP's own: ramped half-and-half initialisation, one-point crossover, uniform subtree mutation (new
subtrees of height 0-2), tournament selection and a static height limit that keeps the parent in place of an
over-height child. `repair` gives a tree that lacks y or f(x) both, and `formula` writes a tree (with its edge
weights, when given) as readable text.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Sequence

import torch
from deap import base, gp, tools

PROTECTION = 1e-7  # the protected log and sqrt read |x| as at least this
TARGET, PREDICTION = "y", "fx"
MUTATION_HEIGHTS = (0, 2)  # heights of the subtrees uniform mutation grows
REPAIR_OPERATORS = ("add", "sub", "mul", "aq")  # op(y, fx) replaces a terminal of a tree that lacks y or fx


def analytic_quotient(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / sqrt(1 + b^2): division's shape near large |b|, finite everywhere."""
    return a / torch.sqrt(1 + b.square())


def protected_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.abs().clamp_min(PROTECTION))


def protected_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.abs().clamp_min(PROTECTION))


# name -> (elementwise torch function, arity), in the reference's order
PRIMITIVES: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
    "add": (torch.add, 2), "sub": (torch.sub, 2), "mul": (torch.mul, 2), "aq": (analytic_quotient, 2),
    "sign": (torch.sign, 1), "square": (torch.square, 1), "abs": (torch.abs, 1), "log": (protected_log, 1),
    "sqrt": (protected_sqrt, 1), "tanh": (torch.tanh, 1), "min": (torch.minimum, 2), "max": (torch.maximum, 2),
}
INFIX = {"add": "+", "sub": "-", "mul": "*"}

PSET = gp.PrimitiveSet("evomal", 2)
for _name, (_function, _arity) in PRIMITIVES.items():
    PSET.addPrimitive(_function, _arity, name=_name)
PSET.addTerminal(1)
PSET.addTerminal(-1)
PSET.renameArguments(ARG0=TARGET, ARG1=PREDICTION)


class Fitness(base.Fitness):
    """One objective, minimised: the validation error (or MSE) of the loss."""

    weights = (-1.0,)


class Expression(gp.PrimitiveTree):
    """A loss expression tree with its fitness (picklable: module-level classes, no deap.creator)."""

    def __init__(self, content: Sequence[gp.Primitive | gp.Terminal]) -> None:
        super().__init__(content)
        self.fitness = Fitness()


def parse(text: str) -> Expression:
    """The expression written as DEAP writes it, e.g. "mul(-1, mul(y, log(fx)))"."""
    return Expression(gp.PrimitiveTree.from_string(text, PSET))


def toolbox(init_heights: tuple[int, int], tournament: int, max_height: int) -> base.Toolbox:
    """DEAP's toolbox for EvoMAL: `expression` (ramped half-and-half in `init_heights`), `select`, and `mate` /
    `mutate` under a static height limit that replaces an over-height child with its parent."""
    box = base.Toolbox()
    box.register("expression", lambda: Expression(gp.genHalfAndHalf(PSET, *init_heights)))
    box.register("select", tools.selTournament, tournsize=tournament)
    box.register("mate", gp.cxOnePoint)
    box.register("subtree", gp.genHalfAndHalf, min_=MUTATION_HEIGHTS[0], max_=MUTATION_HEIGHTS[1])
    box.register("mutate", gp.mutUniform, expr=box.subtree, pset=PSET)
    limit = gp.staticLimit(key=operator.attrgetter("height"), max_value=max_height)
    box.decorate("mate", limit)
    box.decorate("mutate", limit)
    return box


def repair(tree: gp.PrimitiveTree) -> None:
    """In place: a tree that lacks y or fx gets a random terminal replaced by op(y, fx) or op(fx, y), op drawn
    from REPAIR_OPERATORS (the reference's correction)."""
    if {TARGET, PREDICTION} <= {node.value for node in tree if node.arity == 0}:
        return
    arguments = [PSET.mapping[TARGET], PSET.mapping[PREDICTION]]
    random.shuffle(arguments)
    index = random.choice([i for i, node in enumerate(tree) if node.arity == 0])
    tree[index:index + 1] = [PSET.mapping[random.choice(REPAIR_OPERATORS)], *arguments]


def formula(tree: Sequence[gp.Primitive | gp.Terminal], weights: Sequence[float] | None = None) -> str:
    """The tree as text: + - * infix, the other primitives as calls. With `weights` (one per edge, i.e. per node
    after the root, in the tree's order) each node's value is shown scaled by its weight, a constant as the
    product."""
    stack: list[str] = []
    for index in range(len(tree) - 1, -1, -1):
        node = tree[index]
        weight = weights[index - 1] if weights is not None and index > 0 else None
        if node.arity == 0 and node.value not in (TARGET, PREDICTION):
            stack.append(f"{node.value * (1.0 if weight is None else weight):.4g}")
            continue
        arguments = [stack.pop() for _ in range(node.arity)]
        if node.arity == 0:
            text = node.value
        elif node.name in INFIX:
            text = f"({arguments[0]} {INFIX[node.name]} {arguments[1]})"
        else:
            text = f"{node.name}({', '.join(arguments)})"
        stack.append(text if weight is None else f"{weight:.4g}*{text}")
    return stack.pop()
