"""EvoMAL: the primitives, expression trees as losses, the rejection test, the local search, repair and the height
limit, the search's checkpointing, and searched runs through train.py that resume exactly."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_single_task import MNIST_QUICK, QUICK, StopAfter, expect_error, run_train, scalar_tags
from torch import nn

import adalfl.loss_search
import adalfl.trainer
import train
from adalfl.config import EvoMALConfig
from adalfl.evomal import Evaluation, EvoMALLoss, EvoMALSearch, improves_predictions, local_search
from adalfl.gp_expression import PRIMITIVES, PROTECTION, PSET, formula, parse, repair, toolbox
from adalfl.online_step import online_step

CROSS_ENTROPY = "mul(-1, mul(y, log(fx)))"
SQUARED_ERROR = "square(sub(fx, y))"
# seed 1 with 8 candidates: the rejection test passes some candidates of each generation on both data sets
TINY = ["--set", "method=evomal", "--set", "seed=1", "--set", "model.name=linear", "--set", "evomal.population=8",
        "--set", "evomal.generations=2", "--set", "evomal.local_search_steps=3", "--set", "evomal.fitness_steps=4"]


def unit_loss(text: str, prediction: str = "softmax") -> EvoMALLoss:
    tree = parse(text)
    return EvoMALLoss(tree, prediction, [1.0] * (len(tree) - 1))


def test_the_primitive_set_is_the_references_and_the_unsafe_primitives_are_protected() -> None:
    assert len(PRIMITIVES) == 12 and sorted(t.format() for t in PSET.terminals[object]) == ["-1", "1", "fx", "y"]
    x = torch.tensor([0.0, -math.e, 4.0, -4.0], requires_grad=True)
    log, sqrt, aq = PRIMITIVES["log"][0], PRIMITIVES["sqrt"][0], PRIMITIVES["aq"][0]
    assert torch.allclose(log(x), torch.tensor([math.log(PROTECTION), 1.0, math.log(4.0), math.log(4.0)]))
    assert torch.allclose(sqrt(x), torch.tensor([math.sqrt(PROTECTION), math.sqrt(math.e), 2.0, 2.0]))
    assert torch.allclose(aq(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0])), torch.tensor([1.0, 3 / 17**0.5]))
    (grad,) = torch.autograd.grad((log(x) + sqrt(x) + aq(x, x - x.detach())).sum(), x)
    assert torch.isfinite(grad).all()


def test_a_tree_is_the_loss_it_writes_summed_over_classes_and_averaged_over_the_batch() -> None:
    outputs, targets = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 5, (16,))
    assert torch.allclose(unit_loss(CROSS_ENTROPY).double()(outputs, targets), F.cross_entropy(outputs, targets))
    raw, values = torch.randn(16, 1, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert torch.allclose(unit_loss(SQUARED_ERROR, "identity").double()(raw, values), F.mse_loss(raw[:, 0], values))

    tree = parse("aq(fx, max(y, -1))")  # nodes: aq, fx, max, y, -1; edges into fx, max, y, -1
    loss = EvoMALLoss(tree, weights=[2.0, 0.5, 3.0, 1.5]).double()
    y, p = torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = 2 * p / torch.sqrt(1 + (0.5 * torch.maximum(3 * y, torch.tensor(-1.5))) ** 2)
    assert torch.allclose(loss.pointwise(y, p), expected)
    assert formula(tree) == "aq(fx, max(y, -1))" and loss.formula() == "aq(2*fx, 0.5*max(3*y, -1.5))"
    assert formula(parse(CROSS_ENTROPY)) == "(-1 * (y * log(fx)))"
    with pytest.raises(ValueError, match="4 edge weights"):
        EvoMALLoss(tree, weights=[1.0])


def test_edge_weights_start_near_one() -> None:
    weights = EvoMALLoss(parse(CROSS_ENTROPY)).weights.detach()
    assert weights.shape == (5,) and (weights - 1).abs().max() < 0.01 and (weights != 1).all()


def test_the_rejection_test_rejects_a_constant_or_ascending_loss_and_accepts_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(100, 10, generator=generator), torch.randint(0, 10, (100,), generator=generator)
    constant = EvoMALLoss(parse("add(y, sign(fx))"))  # sign(p) = 1 for probabilities: a constant loss
    assert not improves_predictions(constant, logits, labels, 100)
    assert not improves_predictions(EvoMALLoss(parse("mul(y, log(fx))")), logits, labels, 100)  # minus cross-entropy
    cross_entropy = EvoMALLoss(parse(CROSS_ENTROPY))
    assert improves_predictions(cross_entropy, logits, labels, 100)
    assert cross_entropy.weights.grad is None  # the test leaves the loss's own parameters alone
    outputs, values = torch.randn(100, 1, generator=generator), torch.randn(100, generator=generator)
    assert improves_predictions(EvoMALLoss(parse(SQUARED_ERROR), "identity"), outputs, values, 100)


def test_the_local_search_moves_the_edge_weights_and_lowers_the_meta_objective_on_average() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 4, generator=generator) * 2

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 3, (n,), generator=generator)
        return centres[labels] + torch.randn(n, 4, generator=generator), labels

    def episode(k: int) -> tuple[nn.Module, torch.optim.Optimizer, tuple, tuple]:
        torch.manual_seed(k)
        model = nn.Linear(4, 3)
        return model, torch.optim.SGD(model.parameters(), lr=0.05), batch(32), batch(32)

    held_out = [episode(1000 + k) for k in range(8)]
    initial = [{n: p.detach().clone() for n, p in m.state_dict().items()} for m, _, _, _ in held_out]

    def meta_objective(loss: EvoMALLoss) -> float:
        """Mean validation cross-entropy after one step with `loss` from each held-out initialisation."""
        values = []
        for (model, _, train_batch, val_batch), state in zip(held_out, initial, strict=True):
            model.load_state_dict(state)
            online_step(model, loss, torch.optim.SGD(model.parameters(), lr=0.05), train_batch, F.cross_entropy)
            values.append(F.cross_entropy(model(val_batch[0]), val_batch[1]).item())
        return sum(values) / len(values)

    torch.manual_seed(0)
    loss = EvoMALLoss(parse(CROSS_ENTROPY))
    model, optimizer, train_batch, val_batch = episode(0)
    meta_optimizer = torch.optim.SGD(loss.parameters(), lr=0.0)
    online_step(model, loss, optimizer, train_batch, F.cross_entropy, meta=(loss, meta_optimizer, val_batch))
    assert loss.weights.grad is not None and (loss.weights.grad[:4] != 0).all()

    before, start = meta_objective(loss), loss.weights.detach().clone()
    finite = local_search(loss, 40, 0.01, episode, F.cross_entropy)
    assert bool(finite) and (loss.weights.detach()[:4] - start[:4]).abs().min() > 0.05  # the 5th's effect cancels
    assert meta_objective(loss) < before - 0.01


def test_repair_gives_a_tree_both_arguments_and_leaves_a_complete_one_alone() -> None:
    random.seed(0)
    for text in ("add(y, 1)", "sign(-1)", "mul(fx, tanh(1))"):
        tree = parse(text)
        repair(tree)
        terminals = [node.format() for node in tree if node.arity == 0]
        assert {"y", "fx"} <= set(terminals) and len(tree) == len(parse(text)) + 2, str(tree)
    tree = parse(CROSS_ENTROPY)
    repair(tree)
    assert str(tree) == CROSS_ENTROPY


def test_variation_keeps_the_parent_in_place_of_an_over_height_child() -> None:
    random.seed(0)
    box = toolbox((2, 4), tournament=4, max_height=4)
    trees = [box.expression() for _ in range(20)]
    for _ in range(200):
        a, b = (box.clone(t) for t in random.sample(trees, 2))
        children = [*box.mate(a, b), *box.mutate(box.clone(random.choice(trees)))]
        assert all(child.height <= 4 for child in children)


def toy_evaluation(tree) -> Evaluation:
    """A cheap fitness: small trees near height 3 are best; trees with a `sign` are 'rejected'."""
    if "sign" in str(tree):
        return Evaluation(math.inf, [1.0] * (len(tree) - 1), "rejected")
    return Evaluation(abs(tree.height - 3) + len(tree) / 100, [1.0] * (len(tree) - 1), "trained")


def test_the_search_resumes_from_its_weights_only_state_and_leaves_the_global_random_state_alone() -> None:
    search = EvoMALSearch(EvoMALConfig(population=10, generations=5), seed=0)
    outer = random.getstate(), torch.get_rng_state()
    search.step(toy_evaluation)
    assert random.getstate() == outer[0] and torch.equal(torch.get_rng_state(), outer[1])
    saved = io.BytesIO()
    torch.save(search.state_dict(), saved)
    for _ in range(4):
        search.step(toy_evaluation)
    resumed = EvoMALSearch(EvoMALConfig(population=10, generations=5), seed=0)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for _ in range(4):
        resumed.step(toy_evaluation)
    assert resumed.log == search.log and [r["generation"] for r in search.log] == [1, 2, 3, 4, 5]
    assert sum(r["cached"] for r in search.log) > 0 and sum(r["rejected"] for r in search.log) > 0
    assert search.best_fitness == min(e.fitness for e in search.cache.values())
    assert [r["best_so_far"] for r in search.log] == sorted((r["best_so_far"] for r in search.log), reverse=True)
    best = search.best_loss("softmax")
    assert str(best.tree) == search.log[-1]["best_tree"] and not best.weights.requires_grad


@pytest.mark.parametrize(("config", "extra", "metric"), [
    ("evomal_mnist", MNIST_QUICK, "error"),
    ("evomal_california", QUICK, "mse"),
])
def test_a_searched_run_writes_its_expression_search_record_and_loss_shape(tmp_path, shared_data, capsys, config,
                                                                           extra, metric) -> None:
    assert run_train(tmp_path, shared_data, config, "run", *extra, *TINY) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    record = json.loads((run / "evomal_search.json").read_text())
    assert [r["generation"] for r in record] == [1, 2] and record[-1]["best_tree"] == results["evomal_tree"]
    assert all(r["trained"] + r["rejected"] + r["diverged"] + r["cached"] == 8 for r in record)
    assert math.isfinite(record[-1]["best_so_far"]) and results["steps"] == 24
    assert f"evomal: best loss {results['evomal_expression']}" in capsys.readouterr().out
    assert parse(results["evomal_tree"])  # the tree's string is DEAP's and parses back
    shapes = json.loads((run / "loss_shapes.json").read_text())
    assert shapes[0]["phase"] == "online" and all(math.isfinite(v) for v in shapes[0]["y=1"])
    assert f"evomal/best_val_{metric}" in scalar_tags(run / "search")
    assert "analysis/grad_norm_ratio" in scalar_tags(run)
    events = EventAccumulator(str(run / "search"))
    events.Reload()
    assert "evomal/best_loss/text_summary" in events.Tags()["tensors"]


def test_a_run_interrupted_after_a_generation_resumes_exactly(tmp_path, shared_data, monkeypatch) -> None:
    args = [*QUICK, *TINY, "--set", "evomal.generations=3"]
    assert run_train(tmp_path, shared_data, "mse_california", "whole", *args) == 0
    stop = StopAfter(1)  # after the first generation
    assert run_train(tmp_path, shared_data, "mse_california", "split", *args, stop=stop) == 130
    assert len(json.loads((tmp_path / "split" / "evomal_search.json").read_text())) == 1
    assert train.main(["--resume", str(tmp_path / "split"), "--data-root", str(shared_data)]) == 0
    whole, split = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "split"))
    for key in ("history", "evomal_expression", "evomal_tree", "readouts"):
        assert split[key] == whole[key]
    assert (json.loads((tmp_path / "split" / "evomal_search.json").read_text())
            == json.loads((tmp_path / "whole" / "evomal_search.json").read_text()))


@pytest.mark.parametrize(("override", "fragment"), [
    ("evomal.population=1", "evomal.population = 1 must be at least 2"),
    ("evomal.mutation=0.5", "sum to at most 1"),
    ("evomal.init_max_height=12", "<= max_height (10)"),
])
def test_bad_evomal_settings_get_one_clear_message(tmp_path, shared_data, capsys, override, fragment) -> None:
    code = run_train(tmp_path, shared_data, "mse_california", "bad", *QUICK, *TINY, "--set", override)
    expect_error(capsys, code, fragment)


def test_a_search_whose_every_candidate_fails_says_what_to_change(tmp_path, shared_data, capsys, monkeypatch) -> None:
    monkeypatch.setattr(adalfl.loss_search, "improves_predictions", lambda *args: False)
    code = run_train(tmp_path, shared_data, "mse_california", "none", *QUICK, *TINY)
    expect_error(capsys, code, "every EvoMAL candidate was rejected or diverged", "evomal.population")
