"""Episodic meta-training: outer loop over learn2learn tasksets for MAML, Meta-SGD and NPBML.

One meta-iteration: seed Python's `random` from (seed, iteration) so the tasks replay on resume,
sample `meta_batch` episodes, adapt on each support set, average the query losses, clip the
meta-gradient and take an Adam step (cosine-annealed learning rate). Every `eval.every`
iterations the model is scored on fixed meta-validation tasks and the best one kept; at the end
the best model is meta-tested on `eval.test_tasks` fixed tasks. With `pretrain.steps`, the backbone is first
pre-trained as a classifier over the meta-training classes (npbml/pretrain.py) and meta-training starts from it.

Under torchrun the tasks of a meta-batch are split over the ranks and their meta-gradients summed (each task's
loss is divided by the whole meta-batch), so the update is a single process's; meta-validation and meta-test
tasks are split the same way and their accuracies gathered in task order, so the mean and CI are too.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.device import resolve_device
from engine.distributed import (
    EventWriter,
    all_reduce_sum_,
    barrier,
    check_divisible,
    device_for,
    gather_objects,
    shard,
    world,
)
from engine.errors import ConfigError, UserError
from engine.figures import support_shape_figure
from engine.hparams import HParamsSpec
from engine.nonfinite_guard import NonFiniteGuard
from engine.rng import rng_state, seed_everything, set_rng_state
from engine.run_dir import RunDir, write_results
from engine.run_estimate import BAR_FORMAT, RunEta, StepTimer, estimate_message, evaluations_left, timed
from engine.run_loop import StepBoundary, Stop, restore
from engine.tags import TEST, TRAIN, VAL
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from npbml.pretrain import backbone_of, pretrain_backbone
from tasks.episodes import Episode, EpisodeSampler, check_episodes_fit, python_random
from tasks.fewshot_datasets import load_splits

VALIDATION_STREAM, TEST_STREAM = 1, 2


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96 * std / sqrt(n), std the unbiased one (as the reference's)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    return float(x.mean()), float(1.96 * x.std() / math.sqrt(len(x)))


def evaluate(learner: nn.Module, episodes: Iterable[Episode], steps: int, device: torch.device) -> list[float]:
    """Query accuracy after adaptation (no meta-gradient graph) on each episode."""
    learner.eval()
    accuracies = [learner(episode.to(device), steps, train=False)[1] for episode in episodes]
    learner.train()
    return torch.stack(accuracies).tolist() if accuracies else []


def meta_gradient(learner: nn.Module, params: list[torch.Tensor], episodes: list[Episode], steps: int,
                  device: torch.device, vectorized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into `params`' .grad the meta-gradient of the mean query loss over `episodes` (the whole
    meta-batch; under torchrun this rank adapts its share and the gradients are summed over the ranks), task by
    task or, `vectorized`, all tasks in one batched computation; returns the mean query loss and accuracy as
    device tensors (no host sync)."""
    share = [episode.to(device) for episode in shard(episodes)]
    if vectorized:
        try:
            losses, accuracies = learner.forward_tasks(share, steps)
            (losses.sum() / len(episodes)).backward()
        except torch.OutOfMemoryError as error:
            raise UserError(
                f"out of device memory adapting {len(share)} tasks at once: outer.vectorize_tasks holds every task's "
                "graph until the backward pass; set outer.vectorize_tasks: false to adapt them one by one, or lower "
                "outer.meta_batch") from error
    else:
        results = []
        for episode in share:
            loss, accuracy = learner(episode, steps, train=True)
            (loss / len(episodes)).backward()
            results.append(torch.stack([loss.detach(), accuracy.detach().to(loss.dtype)]))
        losses, accuracies = torch.stack(results).unbind(dim=1)
    sums = torch.stack([losses.detach().sum(), accuracies.detach().to(losses.dtype).sum()])
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum_([*grads, sums])
    mean = sums / len(episodes)
    return mean[0], mean[1]


def episode_samplers(config: EpisodicConfig, data_root: Path) -> dict[str, EpisodeSampler]:
    """Episode samplers of the meta-train, meta-validation and meta-test splits; with `eval.test_dataset`, the
    meta-test split is that data set's (cross-domain), its images the shape of the training set's."""
    d = config.data
    splits = load_splits(d.dataset, data_root)
    cross = config.eval.test_dataset
    if cross is not None and cross != d.dataset:
        splits["test"] = load_splits(cross, data_root)["test"]
        shapes = {name: tuple(splits[split][0][0].shape) for name, split in ((d.dataset, "train"), (cross, "test"))}
        if len(set(shapes.values())) > 1:
            raise ConfigError(f"eval.test_dataset = {cross}: its images are {shapes[cross]} but {d.dataset}'s are "
                              f"{shapes[d.dataset]}; meta-test on a data set with images of the training set's shape")
    check_episodes_fit(splits, d.dataset if cross is None else f"{d.dataset} / {cross}", d.ways, d.shots, d.query)
    return {split: EpisodeSampler(data, d.ways, d.shots, d.query, d.train_tasks if split == "train" else -1)
            for split, data in splits.items()}


def fixed_episodes(config: EpisodicConfig, sampler: EpisodeSampler, split: str, count: int, first: int = 0,
                   stride: int = 1) -> Iterator[Episode]:
    """The run's fixed meta-validation or meta-test tasks (the same at every call; see EpisodeSampler.fixed)."""
    stream = VALIDATION_STREAM if split == "validation" else TEST_STREAM
    return sampler.fixed(count, seed=config.seed * 10 + stream, first=first, stride=stride)


def run_hparams(config: EpisodicConfig) -> dict[str, Any]:
    """The settings a grid varies, by their config keys, for TensorBoard's HParams dashboard."""
    return {"method": config.method, "seed": config.seed, "data.dataset": config.data.dataset,
            "model.backbone": config.model.backbone, "data.ways": config.data.ways, "data.shots": config.data.shots,
            "inner.lr": config.inner.lr, "inner.steps": config.inner.steps, "outer.lr": config.outer.lr,
            "outer.meta_batch": config.outer.meta_batch, "outer.iterations": config.outer.iterations,
            "pretrain.steps": config.pretrain.steps}


HPARAMS = HParamsSpec(
    names=("method", "seed", "data.dataset", "model.backbone", "data.ways", "data.shots", "inner.lr", "inner.steps",
           "outer.lr", "outer.meta_batch", "outer.iterations", "pretrain.steps"),
    metrics=(f"{VAL}/accuracy", f"{VAL}/best_accuracy", f"{TEST}/accuracy", f"{TEST}/ci95"),
    values=run_hparams,
)


def describe_device(config: EpisodicConfig, device: torch.device, processes: int) -> str:
    """The device line printed at the start: where the run runs and which options shape its cost."""
    options = [text for text, on in (("tasks vectorized", config.outer.vectorize_tasks),
                                     ("first-order", config.inner.first_order),
                                     (f"{config.pretrain.steps} pre-training steps first", config.pretrain.steps > 0))
               if on]
    line = f"{config.method} on {device}" + (f" x {processes} processes" if processes > 1 else "")
    return line + (f" ({', '.join(options)})" if options else "")


def _optimizer(config: EpisodicConfig, learner: nn.Module):
    """Adam over the meta-parameters (the learned loss's networks at `outer.loss_lr` when set), cosine-annealed."""
    params = [p for p in learner.parameters() if p.requires_grad]
    loss = getattr(learner, "loss", None)
    loss_params = {id(p) for p in loss.parameters()} if loss is not None else set()
    groups = [{"params": [p for p in params if id(p) not in loss_params]},
              {"params": [p for p in params if id(p) in loss_params], "lr": config.outer.loss_lr or config.outer.lr}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=config.outer.lr)
    total = config.outer.iterations if config.outer.cosine else 10**12
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.outer.min_lr)
    return params, optimizer, scheduler


def train(config: EpisodicConfig, run: RunDir, data_root: Path, resume: bool, stop: Stop) -> dict[str, Any]:
    """Meta-train (stopping at an iteration boundary when `stop` asks), keep the best model on meta-validation,
    meta-test it; returns results.json's content."""
    device, ranks = resolve_device(device_for(config.device)), world()
    check_divisible(config.outer.meta_batch, "tasks per meta-batch", "outer.meta_batch")
    samplers = episode_samplers(config, data_root)
    in_shape = tuple(samplers["train"].taskset.dataset[0][0].shape)
    seed_everything(config.seed)
    learner = build_learner(config, in_shape).to(device)
    params, optimizer, scheduler = _optimizer(config, learner)
    if ranks.is_main:
        print(describe_device(config, device, ranks.size))
    state = {"iteration": 0, "best_val": -1.0, "best_iteration": 0, "wall_time": 0.0}
    if resume and run.checkpoint.is_file():
        restore(run.checkpoint, functools.partial(_load, learner, optimizer, scheduler, state, ranks.rank))
    guard = NonFiniteGuard(unit="meta-iteration")

    def check_finite() -> None:
        """Read the device-side record of non-finite iterations (at logging, evaluation and checkpoints only)."""
        guard.check("the meta-loss or its gradient", "lower outer.lr or inner.lr (or set outer.grad_clip); the "
                    f"last good checkpoint is kept in {run.path}")

    def save() -> None:
        check_finite()
        saved = {"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "state": dict(state), "rng": gather_objects(rng_state())}
        if ranks.is_main:
            save_checkpoint(run.checkpoint, saved)

    accuracies = functools.partial(_accuracies, config, samplers, learner, device)
    writer = EventWriter(run.events, purge_step=state["iteration"] + 1)
    total = config.outer.iterations
    bar = tqdm(total=total, initial=state["iteration"], disable=not (config.log.progress and ranks.is_main),
               desc=config.method, dynamic_ncols=True, bar_format=BAR_FORMAT)
    eta = RunEta()
    meta_test = config.eval.test_tasks / config.eval.val_tasks  # the meta-test's cost in meta-validations

    def remaining_time() -> str:
        left = evaluations_left(total, config.eval.every, state["iteration"]) + meta_test
        return eta.text(total - state["iteration"], left)

    started, times = time.time() - state["wall_time"], {"sample": 0.0, "step": 0.0}
    postfix = {"eta": remaining_time()}
    boundary = StepBoundary(stop, save, config.log.checkpoint_every, total)
    timer = StepTimer(device, functools.partial(_report_estimate, config, samplers, learner, device, state, eta))
    if config.pretrain.steps and state["iteration"] == 0:
        blocks = pretrain_backbone(config, samplers["train"].data, samplers["validation"], in_shape, device, run,
                                   stop)
        backbone_of(learner).load_state_dict(blocks, strict=False)
    eta.restart()
    try:
        while state["iteration"] < total:
            iteration = state["iteration"] + 1
            episodes, mean_loss, mean_acc, norm = _meta_iteration(config, learner, params, optimizer, scheduler,
                                                                  samplers["train"], iteration, device, guard, times)
            state["iteration"] = iteration
            if iteration % config.log.every == 0 or iteration == total:
                check_finite()
                postfix.update(_log_iteration(writer, learner, episodes[0].to(device), iteration, mean_loss, mean_acc,
                                              norm, scheduler.get_last_lr()[0], times))
            if iteration % config.eval.every == 0 or iteration == total:
                check_finite()
                with eta.evaluation():
                    postfix["val"] = _validate(config, run, learner, accuracies, writer, state, iteration)
            state["wall_time"] = time.time() - started
            timer.step_done()
            boundary(iteration)
            eta.step_done()
            postfix["eta"] = remaining_time()
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    finally:
        bar.close()
        writer.flush()
    return _finish(config, run, learner, accuracies, writer, state)


def _report_estimate(config: EpisodicConfig, samplers: dict[str, EpisodeSampler], learner: nn.Module,
                     device: torch.device, state: dict[str, Any], eta: RunEta, seconds_per_iteration: float) -> None:
    """Print, once, the projected wall time of the rest of the run: the meta-iterations left at the measured cost,
    and the meta-validations and meta-test at the cost of one timed validation task (which the ETA then counts)."""
    episode = next(fixed_episodes(config, samplers["validation"], "validation", 1))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        per_task = timed(device, lambda: evaluate(learner, [episode], config.eval_steps, device)) / world().size
    eta.expect_evaluation(per_task * config.eval.val_tasks)
    total = config.outer.iterations
    validations = evaluations_left(total, config.eval.every, state["iteration"])
    parts = [(f"{total - state['iteration']} meta-iterations", seconds_per_iteration * (total - state["iteration"])),
             (f"{validations} meta-validations of {config.eval.val_tasks} tasks",
              per_task * validations * config.eval.val_tasks),
             (f"meta-test on {config.eval.test_tasks} tasks", per_task * config.eval.test_tasks)]
    if world().is_main:
        tqdm.write(estimate_message(device, parts, "lower outer.iterations, eval.val_tasks or model.filters"))


def _load(learner: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], rank: int,
          checkpoint: dict[str, Any]) -> None:
    learner.load_state_dict(checkpoint["learner"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    state.update(checkpoint["state"])
    set_rng_state(checkpoint["rng"][rank])


def _accuracies(config: EpisodicConfig, samplers: dict[str, EpisodeSampler], learner: nn.Module,
                device: torch.device, split: str, count: int) -> list[float]:
    """Query accuracies on the same `count` tasks of `split` at every call (meta-validation, meta-test), in
    task order; under torchrun each rank adapts every world-size-th task."""
    ranks = world()
    episodes = fixed_episodes(config, samplers[split], split, count, first=ranks.rank, stride=ranks.size)
    shares = gather_objects(evaluate(learner, episodes, config.eval_steps, device))
    return [shares[index % ranks.size][index // ranks.size] for index in range(count)]


def _meta_iteration(config: EpisodicConfig, learner: nn.Module, params: list[torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, sampler: EpisodeSampler, iteration: int,
                    device: torch.device, guard: NonFiniteGuard, times: dict[str, float]
                    ) -> tuple[list[Episode], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample the iteration's meta-batch (replayable: Python's `random` seeded by seed and iteration), take one outer
    step; returns the episodes and the mean query loss, accuracy and gradient norm as device tensors."""
    tick = time.time()
    with python_random(config.seed * 1_000_003 + iteration):
        episodes = [sampler.sample() for _ in range(config.outer.meta_batch)]
    times["sample"] += time.time() - tick
    optimizer.zero_grad(set_to_none=True)
    mean_loss, mean_acc = meta_gradient(learner, params, episodes, config.inner.steps, device,
                                        vectorized=config.outer.vectorize_tasks)
    norm = torch.nn.utils.clip_grad_norm_(params, config.outer.grad_clip or float("inf"))
    guard.record(torch.isfinite(mean_loss) & torch.isfinite(norm), iteration)
    optimizer.step()
    scheduler.step()
    times["step"] += time.time() - tick
    return episodes, mean_loss, mean_acc, norm


def _log_iteration(writer: EventWriter, learner: nn.Module, episode: Episode, iteration: int, mean_loss: torch.Tensor,
                   mean_acc: torch.Tensor, norm: torch.Tensor, lr: float, times: dict[str, float]) -> dict[str, str]:
    """Write the iteration's scalars and the learned loss's terms; returns the progress bar's loss and accuracy."""
    loss_value, acc_value, norm_value = torch.stack([mean_loss, mean_acc, norm]).tolist()
    _log_train(writer, learner, iteration, loss_value, acc_value, norm_value, lr,
               times["sample"] / max(times["step"], 1e-9))
    _log_loss_terms(writer, learner, episode, iteration)
    return {"loss": f"{loss_value:.3f}", "acc": f"{acc_value:.3f}"}


def _validate(config: EpisodicConfig, run: RunDir, learner: nn.Module, accuracies: Callable[[str, int], list[float]],
              writer: EventWriter, state: dict[str, Any], iteration: int) -> str:
    """Meta-validate; keep the model in best.pt when it is the best so far. Returns the accuracy for the bar."""
    val_acc, _ = mean_ci95(accuracies("validation", config.eval.val_tasks))
    writer.add_scalar(f"{VAL}/accuracy", val_acc, iteration)
    writer.add_scalar(f"{VAL}/best_accuracy", max(val_acc, state["best_val"]), iteration)
    _log_loss_shape(writer, learner, iteration)
    if val_acc > state["best_val"]:
        state.update(best_val=val_acc, best_iteration=iteration)
        if world().is_main:
            save_checkpoint(run.best_checkpoint, {"learner": learner.state_dict(), "iteration": iteration})
    return f"{val_acc:.3f}"


def _finish(config: EpisodicConfig, run: RunDir, learner: nn.Module, accuracies: Callable[[str, int], list[float]],
            writer: EventWriter, state: dict[str, Any]) -> dict[str, Any]:
    """Meta-test the best model; write results.json (main process); returns the results."""
    ranks = world()
    barrier()  # rank 0 has written best.pt
    learner.load_state_dict(load_checkpoint(run.best_checkpoint)["learner"])
    test_acc, test_ci = mean_ci95(accuracies("test", config.eval.test_tasks))
    writer.add_scalar(f"{TEST}/accuracy", test_acc, state["iteration"])
    writer.add_scalar(f"{TEST}/ci95", test_ci, state["iteration"])
    writer.close()
    results = {
        "method": config.method, "test_accuracy": test_acc, "test_ci95": test_ci,
        "test_dataset": config.eval.test_dataset or config.data.dataset,
        "test_tasks": config.eval.test_tasks, "iterations": state["iteration"],
        "best_val_accuracy": state["best_val"], "best_iteration": state["best_iteration"],
        "wall_time_s": state["wall_time"], "seed": config.seed,
        "world_size": ranks.size, "per_rank_meta_batch": config.outer.meta_batch // ranks.size,
    }
    if not ranks.is_main:
        return results
    write_results(run, results)
    print(f"{config.method}: meta-test accuracy {100 * test_acc:.2f} +- {100 * test_ci:.2f}% "
          f"({config.eval.test_tasks} tasks); results in {run.results}")
    return results


def _log_train(writer: EventWriter, learner: nn.Module, iteration: int, loss: float, accuracy: float,
               grad_norm: float, lr: float, sampling_share: float) -> None:
    writer.add_scalar(f"{TRAIN}/loss", loss, iteration)
    writer.add_scalar(f"{TRAIN}/accuracy", accuracy, iteration)
    writer.add_scalar(f"{TRAIN}/grad_norm", grad_norm, iteration)
    writer.add_scalar(f"{TRAIN}/outer_lr", lr, iteration)
    writer.add_scalar("time/sampling_share", sampling_share, iteration)
    inner_lrs = learner.inner_lrs()
    if inner_lrs is not None:
        writer.add_scalar("inner_lr/mean", float(inner_lrs.mean()), iteration)
        writer.add_histogram("inner_lr/values", inner_lrs, iteration)


def _log_loss_terms(writer: EventWriter, learner: nn.Module, episode: Episode, iteration: int) -> None:
    """Does the task-adaptive loss learn? Each learned term's size and its gradient's size in the adapted parameters,
    relative to CE's, at the initialisation, and the meta-gradient norm of its network."""
    if getattr(learner, "loss", None) is None:
        return
    terms = learner.loss_terms(episode)
    for name in learner.loss.nets:
        for kind, suffix in (("value", "over_ce"), ("grad_norm", "grad_over_ce")):
            ratio = abs(terms[kind][name]) / max(terms[kind]["ce"], 1e-12)
            writer.add_scalar(f"learned_loss/{name}_{suffix}", ratio, iteration)
    for name, norm in learner.loss_meta_gradient_norms().items():
        writer.add_scalar(f"learned_loss/{name}_meta_grad_norm", norm, iteration)


def _log_loss_shape(writer: EventWriter, learner: nn.Module, iteration: int) -> None:
    """CE + L_S against the true-class logit margin, as a figure, when the loss is learned."""
    loss = getattr(learner, "loss", None)
    if loss is None or loss.support_net is None:
        return
    margins = torch.linspace(-6.0, 6.0, 61)
    ce = torch.nn.functional.cross_entropy(torch.stack([margins] + [torch.zeros_like(margins)] * (loss.ways - 1), 1),
                                           torch.zeros(len(margins), dtype=torch.long), reduction="none")
    figure = support_shape_figure(margins.tolist(), loss.support_curve(margins).tolist(), ce.tolist())
    writer.add_figure("learned_loss/support_shape", figure, iteration)
