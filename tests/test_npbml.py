"""NPBML's parts: the task-adaptive loss, the meta-gradient's reach, the fixed warp layers, the CI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.config import build_config
from engine.errors import ConfigError
from npbml.config import EpisodicConfig
from npbml.learners import ComponentLearner, build_learner
from npbml.meta_trainer import mean_ci95
from npbml.task_loss import TaskAdaptiveLoss
from tasks.backbones import adapted_names
from tasks.episodes import Episode
from tasks.film import FiLM
from tasks.models import build_model

WAYS, SHOTS, QUERY = 5, 1, 3


def config(adapted_blocks: int | None = 2, first_order: bool = False, **components: bool) -> EpisodicConfig:
    return build_config(EpisodicConfig, {
        "method": "npbml", "model": {"filters": 8, "adapted_blocks": adapted_blocks}, "data": {"query": QUERY},
        "inner": {"steps": 2, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                  "first_order": first_order},
        "components": components,
    })


def episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(WAYS)
    return Episode(torch.rand(WAYS * SHOTS, 1, 28, 28, generator=g), y.repeat_interleave(SHOTS),
                   torch.rand(WAYS * QUERY, 1, 28, 28, generator=g), y.repeat_interleave(QUERY))


def inner_batch(seed: int = 0, support: int = 10, query: int = 15, features: int = 6):
    """Logits and embeddings of an inner batch (support rows first), its support labels and adapted tensors."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(support + query, WAYS, generator=g)
    embedding = torch.randn(support + query, features, generator=g)
    params = [torch.randn(8, 4, 3, 3, generator=g), torch.zeros(8), torch.ones(8) + torch.rand(8, generator=g)]
    return logits, embedding, torch.arange(support) % WAYS, params


def reference_network(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's loss network written out: linear-ReLU, linear-ReLU, linear then leak * z + (1 - leak) *
    softplus_5(z); minus its value at a zero row (a constant of the loss parameters)."""
    def forward(rows: torch.Tensor) -> torch.Tensor:
        (w0, b0), (w1, b1), (w2, b2) = ((layer.weight, layer.bias) for layer in net.layers)
        z = torch.relu(torch.relu(rows @ w0.t() + b0) @ w1.t() + b1) @ w2.t() + b2
        return (0.25 * z + 0.75 * F.softplus(z, beta=5.0)).squeeze(-1)
    return forward(x) - forward(torch.zeros(1, x.shape[1]))


def test_the_terms_are_the_references_formulas() -> None:
    """L_S, L_Q and R against the reference's formulas, computed by hand here: L_Q's inputs are the query logits,
    the raw negative squared distances of the query embeddings to the class prototypes of the support embeddings,
    and cross-entropy with those distances as soft targets; R reads [mean, std, L2, L2] of every tensor in one row."""
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=3, query_net="own")
    for net in loss.nets.values():
        for layer in net.layers:
            torch.nn.init.normal_(layer.weight, 0.0, 0.5)  # away from the init, where every term is ~0
    logits, embedding, y, params = inner_batch()
    terms = loss.terms(logits, embedding, y, params)
    support_logits, query_logits = logits[:10], logits[10:]

    ce = F.cross_entropy(support_logits, y, reduction="none")
    support_in = torch.cat((support_logits, F.one_hot(y, WAYS).float(), ce[:, None]), dim=1)
    torch.testing.assert_close(terms["support"], reference_network(loss.support_net, support_in).mean())

    prototypes = torch.stack([embedding[:10][y == c].mean(dim=0) for c in range(WAYS)])
    distances = torch.stack([torch.stack([-((q - p) ** 2).sum() for p in prototypes]) for q in embedding[10:]])
    soft_ce = F.cross_entropy(query_logits, distances, reduction="none")  # the reference's call, soft targets
    query_in = torch.cat((query_logits, distances, soft_ce[:, None]), dim=1)
    torch.testing.assert_close(terms["query"], reference_network(loss.query_net, query_in).mean())

    row = torch.cat([torch.stack((p.mean(), p.std(), p.norm(p=2), p.norm(p=2))) for p in params])[None]
    torch.testing.assert_close(terms["regulariser"], reference_network(loss.regulariser_net, row).mean())
    torch.testing.assert_close(terms["ce"], ce.mean())


def test_the_regulariser_differentiates_through_the_norms_only() -> None:
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=2, learned=["regulariser"])
    for layer in loss.regulariser_net.layers:
        torch.nn.init.normal_(layer.weight, 0.0, 0.5)
    params = [torch.randn(6, 3, requires_grad=True), (torch.rand(4) + 1).requires_grad_()]
    logits, embedding, y, _ = inner_batch()
    grads = torch.autograd.grad(loss.terms(logits, embedding, y, params)["regulariser"], params)

    def by_hand(p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        row = torch.cat([torch.stack((p.detach().mean(), p.detach().std(), p.norm(), p.norm())) for p in (p0, p1)])
        return reference_network(loss.regulariser_net, row[None]).mean()

    expected = torch.autograd.grad(by_hand(*params), params)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_l_q_runs_through_the_inductive_network_unless_it_has_its_own() -> None:
    shared = TaskAdaptiveLoss(WAYS, adapted_tensors=3)
    assert shared.query_net is shared.support_net
    own = TaskAdaptiveLoss(WAYS, adapted_tensors=3, query_net="own")
    assert own.query_net is not own.support_net
    only_query = TaskAdaptiveLoss(WAYS, adapted_tensors=3, learned=["query"])
    assert only_query.support_net is None and only_query.query_net is not None
    widths = [layer.out_features for layer in shared.support_net.layers]
    assert widths == [2 * WAYS + 1, 2 * WAYS + 1, 1]
    assert [layer.out_features for layer in shared.regulariser_net.layers] == [12, 12, 1]
    assert shared.support_net.films is None  # FiLM is commented out in the reference's loss network
    assert TaskAdaptiveLoss(WAYS, adapted_tensors=3, film=True).support_net.films is not None


def test_task_adaptive_loss_starts_as_cross_entropy() -> None:
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=3)
    logits, embedding, y, params = inner_batch()
    value = loss(logits, embedding, y, params)
    assert value.item() == pytest.approx(F.cross_entropy(logits[:10], y).item(), abs=1e-3)


@pytest.mark.parametrize("init", ["small", "small_zero_bias", "zero_output"])
def test_the_learned_terms_start_near_zero_in_value_and_inner_gradient(init) -> None:
    """What reaches the inner loop is the terms' gradient in the logits; it starts (nearly) at zero for every
    init, so M starts as cross-entropy."""
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=3, init=init)
    logits, embedding, y, params = inner_batch()
    logits.requires_grad_()
    terms = loss.terms(logits, embedding, y, params)
    learned = terms["support"] + terms["query"] + terms["regulariser"]
    (inner_signal,) = torch.autograd.grad(learned, logits)
    assert inner_signal.norm() < 1e-3 and abs(learned.item()) < 1e-3


def test_the_small_init_is_the_references_and_zero_biases_are_an_option() -> None:
    """The reference's loss networks draw the weights from N(0, 0.01) and keep PyTorch's default biases."""
    torch.manual_seed(0)
    for init, zero_bias in (("small", False), ("small_zero_bias", True)):
        for layer in TaskAdaptiveLoss(WAYS, adapted_tensors=16, init=init).regulariser_net.layers:
            assert layer.weight.std().item() == pytest.approx(0.01, rel=0.5)
            bound = 1 / math.sqrt(layer.in_features)
            assert (layer.bias == 0).all() if zero_bias else (layer.bias.abs().max() > 0.2 * bound)
            assert layer.bias.abs().max() <= bound


def test_a_term_whose_network_is_dead_reads_zero() -> None:
    """A network whose ReLUs are off for every input is a constant: the term reads 0 and passes no gradient."""
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=2)
    with torch.no_grad():
        loss.regulariser_net.layers[1].bias.fill_(-10.0)
    params = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.ones(8, requires_grad=True)]
    logits, embedding, y, _ = inner_batch()
    terms = loss.terms(logits, embedding, y, params)
    assert terms["regulariser"].item() == 0.0
    grads = torch.autograd.grad(terms["regulariser"], params, allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)
    assert terms["support"].item() != 0.0


def test_the_logged_terms_show_a_dead_regulariser_as_zero_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    learner = build_learner(config(), (1, 28, 28))
    terms = learner.loss_terms(episode())
    assert set(terms["value"]) == set(terms["grad_norm"]) == {"ce", "support", "query", "regulariser"}
    assert terms["grad_norm"]["ce"] > 0 and terms["grad_norm"]["regulariser"] > 0
    with torch.no_grad():
        learner.loss.regulariser_net.layers[1].bias.fill_(-10.0)
    dead = learner.loss_terms(episode())
    assert dead["value"]["regulariser"] == 0.0 and dead["grad_norm"]["regulariser"] == 0.0
    assert dead["grad_norm"]["ce"] == pytest.approx(terms["grad_norm"]["ce"])


@pytest.mark.parametrize("adapted_blocks, learned_loss", [(None, False), (2, True)])
def test_inner_update_is_per_tensor_nesterov_sgd(adapted_blocks: int | None, learned_loss: bool) -> None:
    """Nesterov SGD tensor by tensor, with the loss recomputed from the images in every step, equals the
    learner's foreach update on trunk features computed once per episode; L_Q sees the first query
    example of each class."""
    torch.manual_seed(0)
    learner = build_learner(config(adapted_blocks, warp=False, learned_loss=learned_loss, film=False), (1, 28, 28))
    task, inner = episode(), learner.inner
    params = {n: p.detach() for n, p in learner.backbone.named_parameters() if n in learner.names}
    buffers = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(2):
        params = {n: p.requires_grad_() for n, p in params.items()}
        if learner.loss is None:
            loss = F.cross_entropy(functional_call(learner.backbone, params, (task.support_x,)), task.support_y)
        else:  # one pass over the support and the transductive query examples
            batch = torch.cat((task.support_x, task.query_x.reshape(WAYS, QUERY, 1, 28, 28)[:, :1].flatten(0, 1)))
            logits, embedding = functional_call(learner.backbone, params, (batch,), {"with_embedding": True})
            loss = learner.loss(logits, embedding, task.support_y, list(params.values()))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for n, p in params.items():
            g = grads[n] + inner.weight_decay * p.detach()
            buffers[n] = inner.momentum * buffers[n] + g
            params[n] = p.detach() - inner.lr * (g + inner.momentum * buffers[n])
    adapted = learner.adapt(task, steps=2, create_graph=False)
    assert set(adapted) == set(params)
    for n, p in params.items():
        assert torch.allclose(adapted[n], p, atol=1e-6), n


@pytest.mark.parametrize("adapted_blocks", [None, 2])
def test_meta_gradient_reaches_every_meta_learned_parameter(adapted_blocks: int | None) -> None:
    torch.manual_seed(0)
    learner = build_learner(config(adapted_blocks, learned_inner_lr=True), (1, 28, 28))
    loss, _ = learner(episode(), steps=2, train=True)
    loss.backward()
    groups = {"init": 0, "warps": 0, "film": 0, "loss": 0, "lrs": 0}
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no meta-gradient reaches {name}"
        group = next((g for g in ("warps", "film", "loss", "lrs") if g in name.split(".")), "init")
        groups[group] += 1
    assert all(groups.values()), groups


@pytest.mark.parametrize("adapted_blocks", [None, 2])
def test_warp_and_film_are_fixed_in_the_inner_loop(adapted_blocks: int | None) -> None:
    torch.manual_seed(0)
    learner = build_learner(config(adapted_blocks), (1, 28, 28))
    assert isinstance(learner, ComponentLearner)
    names = adapted_names(learner.backbone)
    assert names and not [n for n in names if "warp" in n or "film" in n]
    before = {n: p.detach().clone() for n, p in learner.backbone.named_parameters()}
    adapted = learner.adapt(episode(), steps=2, create_graph=True)
    assert set(adapted) == set(names)
    for name, p in learner.backbone.named_parameters():
        assert torch.equal(p, before[name]), name
        if name in adapted:
            assert not torch.equal(adapted[name], p), f"{name} was not adapted"


def test_first_order_meta_gradient_reaches_the_trunk_and_warps_but_not_the_loss() -> None:
    torch.manual_seed(0)
    learner = build_learner(config(2, first_order=True), (1, 28, 28))
    loss, _ = learner(episode(), steps=2, train=True)
    loss.backward()
    for name, p in learner.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached != name.startswith("loss."), name


def test_only_the_top_blocks_are_adapted_warped_and_conditioned() -> None:
    model = build_model("conv4", (1, 28, 28), WAYS, filters=8, adapted_blocks=2, warp=True, film=True)
    assert {n.split(".")[1] for n in adapted_names(model) if n.startswith("blocks.")} == {"2", "3"}
    assert "head.weight" in adapted_names(model)
    assert sorted(model.warps) == ["2", "3"]
    films = {n.split(".")[1] for n, _ in model.named_parameters() if "film" in n.split(".")}
    assert films == {"2", "3"}
    x = torch.rand(4, 1, 28, 28)
    assert model.trunk(x).shape == (4, 8, 7, 7)
    assert torch.equal(model(x), model(model.trunk(x), from_trunk=True))


def test_film_modulates_every_example_of_the_task_alike() -> None:
    torch.manual_seed(0)
    film = FiLM(4, 3)
    torch.nn.init.normal_(film.map.weight)
    z, condition = torch.randn(2, 3, 5, 5), torch.randn(4)
    gamma, beta = film.map(condition).split(3)
    expected = (1 + gamma[None, :, None, None]) * z + beta[None, :, None, None]
    assert torch.allclose(film(z, condition), expected, atol=1e-6)
    assert torch.allclose(film(z[:, :, 0, 0], condition), expected[:, :, 0, 0], atol=1e-6)


def test_warp_layers_start_as_identity() -> None:
    torch.manual_seed(0)
    with_warp = build_model("conv4", (1, 28, 28), WAYS, filters=8, warp=True)
    plain = build_model("conv4", (1, 28, 28), WAYS, filters=8)
    plain.load_state_dict({k: v for k, v in with_warp.state_dict().items() if k in plain.state_dict()})
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(with_warp(x), plain(x), atol=1e-5)


def test_film_starts_as_the_references() -> None:
    """The backbone's FiLM maps: weights N(0, 0.01), biases PyTorch's default U(+-1/sqrt(fan_in))."""
    torch.manual_seed(0)
    film = FiLM(64, 32)
    assert film.map.weight.std().item() == pytest.approx(0.01, rel=0.1)
    bound = 1 / math.sqrt(64)
    assert film.map.bias.abs().max() <= bound and film.map.bias.std() > 0.3 * bound


@pytest.mark.parametrize("adapted_blocks", [None, 2])
def test_ablation_without_learned_init_freezes_the_initialisation(adapted_blocks: int | None) -> None:
    learner = build_learner(config(adapted_blocks, learn_init=False, learned_loss=False, film=False), (1, 28, 28))
    loss, _ = learner(episode(), steps=2, train=True)
    loss.backward()
    trainable = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert trainable and all("warp" in n for n in trainable)


def test_a_reset_head_starts_every_task_at_zero_and_is_not_meta_learned() -> None:
    torch.manual_seed(0)
    learner = build_learner(config(reset_head=True), (1, 28, 28))
    assert not learner.backbone.head.weight.requires_grad and not learner.backbone.head.bias.requires_grad
    start = learner.adapt(episode(), steps=0, create_graph=True)
    assert not start["head.weight"].any() and not start["head.bias"].any()
    adapted = learner.adapt(episode(), steps=1, create_graph=False)
    assert adapted["head.weight"].abs().sum() > 0  # the inner loop moves it from zero
    loss, _ = learner(episode(), steps=2, train=True)
    loss.backward()
    assert learner.backbone.head.weight.grad is None
    reached = [n for n, p in learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert "backbone.blocks.3.unit.conv.weight" in reached and "backbone.blocks.0.unit.conv.weight" in reached
    terms = learner.loss_terms(episode())  # TensorBoard's view of the terms, at the zero head
    assert all(math.isfinite(v) for group in terms.values() for v in group.values())


def test_meta_test_adaptation_builds_no_graph() -> None:
    learner = build_learner(config(), (1, 28, 28))
    loss, accuracy = learner(episode(), steps=2, train=False)
    assert not loss.requires_grad and 0.0 <= accuracy.item() <= 1.0


def test_resnet12_runs() -> None:
    model = build_model("resnet12", (3, 32, 32), WAYS, filters=4, adapted_blocks=2, warp=True, film=True)
    x = torch.rand(2, 3, 32, 32)
    assert model.trunk(x).shape == (2, 8, 8, 8)  # filters x 2 after the first block
    assert model(x).shape == (2, WAYS)


def test_ci95() -> None:
    values = [0.5, 0.7, 0.6, 0.8]
    mean, ci = mean_ci95(values)
    std = math.sqrt(sum((v - 0.65) ** 2 for v in values) / 3)  # unbiased, as the reference
    assert mean == pytest.approx(0.65) and ci == pytest.approx(1.96 * std / 2)


@pytest.mark.parametrize("override, message", [
    ({"method": "npbml", "model": {"backbone": "resnet18"}}, "choose one of: conv4, resnet12"),
    ({"method": "maml", "inner": {"momentum": 0.9}}, "plain SGD"),
    ({"method": "npbml", "data": {"ways": 1}}, "data.ways"),
    ({"method": "npbml", "components": {"warps": True}}, "did you mean 'components.warp'"),
    ({"method": "maml", "model": {"adapted_blocks": 2}}, "NPBML option"),
    ({"method": "npbml", "model": {"adapted_blocks": 5}}, "between 0 and 4"),
    ({"method": "npbml", "model": {"adapted_blocks": 0}}, "adapts only the head"),
    ({"method": "npbml", "components": {"loss_terms": []}}, "learned_loss=false removes them all"),
    ({"method": "npbml", "components": {"loss_terms": ["query", "query"]}}, "each learned term once"),
    ({"method": "npbml", "components": {"loss_terms": ["relation"]}}, "choose one of: support, query, regulariser"),
])
def test_bad_config(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(EpisodicConfig, override)


def test_the_loss_networks_can_have_their_own_outer_learning_rate() -> None:
    from npbml.meta_trainer import _optimizer

    learner = build_learner(build_config(EpisodicConfig, {"method": "npbml", "model": {"filters": 8},
                                                          "outer": {"lr": 1e-3, "loss_lr": 1e-2}}), (1, 28, 28))
    _, optimizer, _ = _optimizer(build_config(EpisodicConfig, {"method": "npbml", "outer": {"loss_lr": 1e-2}}),
                                 learner)
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {lrs[id(p)] for p in learner.loss.parameters()} == {1e-2}
    assert {lrs[id(p)] for p in learner.backbone.parameters() if p.requires_grad} == {1e-3}


def test_leaving_out_every_learned_term_leaves_cross_entropy() -> None:
    torch.manual_seed(0)
    loss = TaskAdaptiveLoss(WAYS, adapted_tensors=3)
    for net in (loss.support_net, loss.regulariser_net):  # terms of order 1, not ~1e-5 (L_Q shares L_S's net)
        for layer in net.layers:
            torch.nn.init.normal_(layer.weight)
    batch = inner_batch(support=WAYS, query=3)
    logits, _, y, _ = batch
    full = loss(*batch)
    assert all(abs(t.item()) > 0.05 for t in loss.terms(*batch).values())
    with loss.leaving_out("support", "query", "regulariser"):
        assert torch.allclose(loss(*batch), F.cross_entropy(logits[:WAYS], y))
    with loss.leaving_out("regulariser"):
        terms = loss.terms(*batch)
        assert torch.allclose(loss(*batch), full - terms["regulariser"])
    assert torch.equal(loss(*batch), full)  # restored after the block
    with pytest.raises(ValueError, match="unknown terms"), loss.leaving_out("R"):
        pass


def test_a_loss_without_the_query_term_is_inductive_and_its_terms_still_learn() -> None:
    torch.manual_seed(0)
    learner = build_learner(config(loss_terms=["support", "regulariser"]), (1, 28, 28))
    assert learner.loss.query_net is None and list(learner.loss.nets) == ["support", "regulariser"]
    task = episode()
    assert torch.equal(learner.inner_x(task.support_x, task.query_x), task.support_x)  # no query examples
    assert set(learner.loss_terms(task)["value"]) == {"ce", "support", "regulariser"}
    loss, _ = learner(task, steps=2, train=True)
    loss.backward()
    for name, p in learner.loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(learner.loss_meta_gradient_norms()) == {"support", "regulariser"}
    with pytest.raises(ValueError, match="this loss's terms are ce, support, regulariser"), \
            learner.loss.leaving_out("query"):
        pass


def test_under_cross_entropy_a_zero_head_adapts_as_the_references_shared_row() -> None:
    """The README's claim for `reset_head`: a start shared by every class shifts all logits alike, so with a
    cross-entropy inner loop (momentum, weight decay included) the query loss is the same as from zero."""
    torch.manual_seed(0)
    learner = build_learner(config(reset_head=True, learned_loss=False), (1, 28, 28))
    task = episode()
    from_zero, _ = learner(task, steps=3, train=False)
    start = learner.task_start()
    width = start["head.weight"].shape[1]
    learner.task_start = lambda: {**start, "head.weight": torch.randn(1, width).expand(WAYS, width).clone(),
                                  "head.bias": torch.full((WAYS,), 0.3)}
    from_row, _ = learner(task, steps=3, train=False)
    assert torch.allclose(from_row, from_zero, atol=1e-5)
