"""A single-task run from start to end: phase 1 (ml3, adalfl), the loss search (taylorglo, evomal), phase 2, then
results.json; with the projected wall time printed once per phase.

Phase 1 (ml3, adalfl): `meta.init_steps` meta steps, each one differentiable base step on a
training batch followed by a loss-network update from the task loss on a meta batch; the base
model is re-initialised every `meta.reset_period` steps. Phase 2: `train.steps` base steps of
one model from a fresh initialisation; adalfl keeps meta-learning the loss (at every `meta.update_every`-th
step), ml3 freezes it, ce/mse/label_smoothing/sparse_lsr use a handcrafted loss.
taylorglo first searches its loss with CMA-ES, evomal with genetic programming and a gradient local search (both
checkpointed per generation), then trains with it frozen.
For every method with a loss other than the task's own, phase 2 logs two readouts every
`log.scalars_every` steps (adalfl/readouts.py): the gradient-norm ratio to the task loss and argmin_p l(1, p).
The run's state (models, optimizers, the learned loss, records) lives in `SingleTaskTrainer` (adalfl/trainer.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adalfl.config import SingleTaskConfig
from adalfl.evomal import EvoMALLoss
from adalfl.methods import METHOD_SPECS
from adalfl.online_step import online_step
from adalfl.streams import INIT_META_STREAM, INIT_TRAIN_STREAM, META_STREAM, TRAIN_STREAM
from adalfl.trainer import SingleTaskTrainer
from engine.distributed import EventWriter
from engine.hparams import HParamsSpec
from engine.run_dir import RunDir, write_results, write_text_atomic
from engine.run_estimate import StepTimer, estimate_message, timed
from engine.run_estimate import evaluations_left as remaining_evaluations
from engine.run_loop import StepBoundary, Stop, restore
from engine.selection import selection_summary
from engine.tags import PHASE_1, TEST, TRAIN, VAL

# The config to name when a run's projected wall time on a CPU exceeds a day, by data set.
CPU_SIZED_CONFIGS = {"cifar10": "configs/adalfl_cifar_small.yaml"}


def evaluations_left(trainer: SingleTaskTrainer) -> int:
    """Evaluations still to come in phase 2 (one every train.eval_every steps and one at the end)."""
    return remaining_evaluations(trainer.config.train.steps, trainer.config.train.eval_every, trainer.step)


def evaluation_seconds(trainer: SingleTaskTrainer) -> float:
    """One evaluation (validation and test sets), timed on one chunk of this rank's share."""
    chunk = trainer.config.train.eval_batch_size
    inputs, _ = trainer.task.batch("val", torch.arange(min(chunk, trainer.task.size("val"))), device=trainer.device)
    trainer.model.eval()
    with torch.no_grad():
        seconds = timed(trainer.device, lambda: trainer.model(inputs))
    trainer.model.train()
    chunks = sum(math.ceil(trainer.task.size(split) / chunk) for split in ("val", "test"))
    return seconds * math.ceil(chunks / trainer.world.size)


def remaining_time(trainer: SingleTaskTrainer) -> str:
    """The whole run's remaining time for the progress bar: phase 1's steps left (at its step cost while it
    runs), phase 2's and the evaluations to come."""
    cfg = trainer.config
    phase_1 = cfg.meta.init_steps - trainer.init_step if trainer.learns_loss else 0
    return trainer.eta.text(phase_1 + cfg.train.steps - trainer.step, evaluations_left(trainer))


def estimate_reporter(trainer: SingleTaskTrainer, phase: str):
    """Print, once per phase, the projected wall time of the rest of the run from its measured steps, and on a
    CPU where that exceeds a day, a config sized for it."""
    def report(seconds_per_step: float) -> None:
        cfg = trainer.config
        if phase == "phase 1":
            parts = [("phase 1", seconds_per_step * (cfg.meta.init_steps - trainer.init_step)),
                     ("phase 2 (at phase 1's step cost)", seconds_per_step * cfg.train.steps)]
        else:
            parts = [("phase 2", seconds_per_step * (cfg.train.steps - trainer.step))]
        evaluation = evaluation_seconds(trainer)
        trainer.eta.expect_evaluation(evaluation)
        parts.append((f"{evaluations_left(trainer)} evaluations", evaluation * evaluations_left(trainer)))
        small = CPU_SIZED_CONFIGS.get(cfg.data.dataset)
        advice = f"{small} is sized for a CPU" if small else "lower train.steps or choose a smaller model.name"
        if trainer.world.is_main:
            tqdm.write(estimate_message(trainer.device, parts, advice))
    return report


def offline_initialisation(trainer: SingleTaskTrainer, stop: Stop) -> None:
    """Phase 1: learn the loss's initial shape over short horizons of freshly initialised models."""
    meta = trainer.config.meta
    writer = EventWriter(trainer.run.events / PHASE_1, purge_step=trainer.init_step or None)
    bar = trainer.progress_bar("phase 1: loss init")
    trainer.eta.restart()
    postfix = {"eta": remaining_time(trainer)}
    timer = StepTimer(trainer.device, estimate_reporter(trainer, "phase 1"))
    boundary = StepBoundary(stop, trainer.save, trainer.config.train.checkpoint_every, meta.init_steps)
    try:
        while trainer.init_step < meta.init_steps:
            trainer.clock.start()
            if trainer.init_model is None or trainer.init_step % meta.reset_period == 0:
                trainer.init_model = trainer.fresh_base(stream=1 + trainer.init_step)
            model, optimizer, _ = trainer.init_model
            batch = trainer.batch("train", trainer.init_step, INIT_TRAIN_STREAM)
            stats = trainer.adaptive.step(model, optimizer, batch, trainer.meta_batch(batch, trainer.init_step,
                                                                                INIT_META_STREAM), adapt=True)
            trainer.init_guard.record(stats.finite, trainer.init_step)
            trainer.init_step += 1
            trainer.clock.stop()
            if trainer.init_step % trainer.config.log.scalars_every == 0:
                values = trainer.log_step(writer, PHASE_1, trainer.init_step, stats)
                probed = trainer.batch("train", trainer.init_step - 1, INIT_TRAIN_STREAM, whole=True)
                trainer.records.offline(writer, trainer.fresh_base(stream=0)[0], trainer.init_model[0],
                                        trainer.loss_net, probed, trainer.init_step)
                postfix.update(learned=f"{values['learned_loss']:.4f}", meta=f"{values['meta_loss']:.4f}")
            trainer.eta.step_done()
            postfix["eta"] = remaining_time(trainer)
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            timer.step_done()
            if trainer.init_step == meta.init_steps:
                trainer.init_model = None
                trainer.records.shape(writer, trainer.loss_net, "init", trainer.init_step)
            boundary(trainer.init_step)
    finally:
        writer.close()


def loss_search(trainer: SingleTaskTrainer, stop: Stop) -> None:
    """TaylorGLO / EvoMAL: generations of the loss search on the validation metric, checkpointed after each;
    then the best loss."""
    method, generations = trainer.config.method, trainer.search.generations
    writer = EventWriter(trainer.run.events / "search", purge_step=trainer.search.generation)
    boundary = StepBoundary(stop, trainer.save, 1, generations)  # every generation is checkpointed
    bar = tqdm(total=generations, initial=trainer.search.generation, desc=f"{method} search",
               unit="generation", dynamic_ncols=True, disable=not trainer.world.is_main)
    try:
        while trainer.search.generation < generations:
            trainer.clock.start()
            record = trainer.search.step()
            trainer.clock.stop()
            for key in ("best", "median", "best_so_far"):
                writer.add_scalar(f"{method}/{key}_val_{trainer.metric}", record[key], record["generation"])
            if trainer.world.is_main:
                write_text_atomic(trainer.run.path / f"{method}_search.json", json.dumps(trainer.search.log, indent=1))
            bar.update()
            bar.set_postfix(best=f"{trainer.search.best_fitness:.4f}")
            boundary(trainer.search.generation)
    finally:
        bar.close()
        writer.close()
    trainer.loss_net = trainer.search.best_loss()
    if isinstance(trainer.loss_net, EvoMALLoss):
        formula = trainer.loss_net.formula()
        with EventWriter(trainer.run.events / "search") as text_writer:
            text_writer.add_text("evomal/best_loss", formula, trainer.search.generation)
        if trainer.world.is_main:
            print(f"evomal: best loss {formula} (val {trainer.metric} {trainer.search.best_fitness:.4f})")


def online_training(trainer: SingleTaskTrainer, stop: Stop) -> None:
    """Phase 2: train the model for `train.steps` steps; adalfl adapts the loss at every step."""
    cfg = trainer.config
    # no purge at a fresh start: its session start (engine/hparams.py) is at step 0
    writer = EventWriter(trainer.run.events, purge_step=trainer.step or None)
    adapt = trainer.spec.online
    loss_fn = trainer.loss_net if trainer.loss_net is not None else trainer.handcrafted_loss
    bar = trainer.progress_bar(f"phase 2: {cfg.method}" if trainer.learns_loss else cfg.method)
    timer = StepTimer(trainer.device, estimate_reporter(trainer, "phase 2"))
    boundary = StepBoundary(stop, trainer.save, cfg.train.checkpoint_every, cfg.train.steps)
    trainer.eta.restart()
    postfix = {"eta": remaining_time(trainer)}
    try:
        if trainer.step == 0 and trainer.loss_net is not None:
            trainer.records.shape(writer, trainer.loss_net, "online", 0)
        while trainer.step < cfg.train.steps:
            trainer.clock.start()
            batch = trainer.batch("train", trainer.step, TRAIN_STREAM)
            if trainer.adaptive is not None:
                meta_batch = (trainer.meta_batch(batch, trainer.step, META_STREAM)
                              if adapt and trainer.adaptive.update_due else None)
                stats = trainer.adaptive.step(trainer.model, trainer.optimizer, batch, meta_batch,
                                           adapt=None if adapt else False)
                if stats.meta_loss is not None:
                    trainer.meta_stats = stats
            else:
                stats = online_step(trainer.model, loss_fn, trainer.optimizer, batch, trainer.task_loss,
                                    amp=trainer.amp)
            trainer.guard.record(stats.finite, trainer.step)
            trainer.scheduler.step()
            trainer.step += 1
            trainer.clock.stop()
            if trainer.step % cfg.log.scalars_every == 0:
                values = trainer.log_step(writer, TRAIN, trainer.step, stats)
                writer.add_scalar(f"{TRAIN}/lr", trainer.optimizer.param_groups[0]["lr"], trainer.step)
                if trainer.loss_net is not None:
                    latest = trainer.batch("train", trainer.step - 1, TRAIN_STREAM, whole=True)
                    trainer.records.online(writer, trainer.model, trainer.loss_net, latest, trainer.step)
                postfix["loss"] = f"{values['task_loss']:.4f}"
                if "meta_loss" in values:
                    postfix["meta"] = f"{values['meta_loss']:.4f}"
            if adapt and trainer.step % cfg.log.loss_shape_every == 0:
                trainer.records.shape(writer, trainer.loss_net, "online", trainer.step)
            if trainer.step % cfg.train.eval_every == 0 or trainer.step == cfg.train.steps:
                trainer.check_finite()
                with trainer.eta.evaluation():
                    record = trainer.log_evaluation(writer)
                postfix[f"val_{trainer.metric}"] = f"{record[f'val_{trainer.metric}']:.4f}"
            trainer.eta.step_done()
            postfix["eta"] = remaining_time(trainer)
            bar.update()
            bar.set_postfix(postfix, refresh=False)
            timer.step_done()
            boundary(trainer.step)
    finally:
        writer.close()


def run_hparams(cfg: SingleTaskConfig) -> dict[str, Any]:
    """The settings a grid varies, by their config keys, for TensorBoard's HParams dashboard (the learned loss's
    for the methods that learn one; meta.max_grad_ratio resolved)."""
    values = {"method": cfg.method, "seed": cfg.seed, "data.dataset": cfg.data.dataset, "model.name": cfg.model.name,
              "optimizer.name": cfg.optimizer.name, "optimizer.lr": cfg.optimizer.lr, "train.steps": cfg.train.steps,
              "train.batch_size": cfg.train.batch_size}
    if METHOD_SPECS[cfg.method].learns_loss:
        meta = cfg.meta
        values |= {"meta.lr": meta.lr, "meta.init_steps": meta.init_steps, "meta.loss_form": meta.loss_form,
                   "meta.batch_source": meta.batch_source, "meta.max_grad_ratio": meta.grad_ratio(cfg.method),
                   "meta.update_every": meta.update_every, "meta.grad_scale": meta.grad_scale}
    return values


HPARAMS = HParamsSpec(
    names=("method", "seed", "data.dataset", "model.name", "optimizer.name", "optimizer.lr", "train.steps",
           "train.batch_size", "meta.lr", "meta.init_steps", "meta.loss_form", "meta.batch_source",
           "meta.max_grad_ratio", "meta.update_every", "meta.grad_scale"),
    metrics=tuple(tag for metric in ("error", "mse")
                  for tag in (f"{VAL}/{metric}", f"{TEST}/{metric}", f"{TEST}/{metric}_at_best_val")),
    values=run_hparams,
)


def run_results(trainer: SingleTaskTrainer) -> dict[str, Any]:
    """results.json's content: the final and validation-selected test metric, compute, records."""
    final, cfg, metric = trainer.history[-1], trainer.config, trainer.metric
    return {
        "method": cfg.method, "dataset": cfg.data.dataset, "model": cfg.model.name, "seed": cfg.seed,
        "steps": trainer.step, "init_steps": trainer.init_step if trainer.learns_loss else 0,
        "world_size": trainer.world.size, "per_rank_batch_size": cfg.train.batch_size // trainer.world.size,
        f"test_{metric}": final[f"test_{metric}"], f"val_{metric}": final[f"val_{metric}"],
        **selection_summary(trainer.history, trainer.metric),
        "test_loss": final["test_loss"], "wall_time_s": round(trainer.clock.wall, 3),
        "cpu_time_s": round(trainer.clock.cpu, 3), "compute_s": round(trainer.clock.seconds(trainer.device), 3),
        "history": trainer.history,
        "readouts": trainer.records.readouts, "init_readouts": trainer.records.init_readouts,
        **(trainer.search.results() if trainer.search is not None else {}),
    }


def train(config: SingleTaskConfig, run: RunDir, data_root: Path, resume: bool, stop: Stop) -> dict[str, Any]:
    """Run (or resume) a single-task experiment in `run`, stopping at a step boundary when `stop` asks; writes
    results.json and returns it."""
    trainer = SingleTaskTrainer(config, run, data_root)
    if resume:
        restore(run.checkpoint, trainer.load_state_dict)
    if trainer.world.is_main:
        print(trainer.describe_device())
    try:
        if trainer.learns_loss and trainer.init_step < config.meta.init_steps:
            offline_initialisation(trainer, stop)
        if trainer.search is not None and trainer.search.generation < trainer.search.generations:
            loss_search(trainer, stop)
        if trainer.step < config.train.steps:
            online_training(trainer, stop)
    finally:
        trainer.close_progress_bar()
    results = run_results(trainer)
    if not trainer.world.is_main:
        return results
    metric = trainer.metric
    if trainer.records.loss_shapes:
        write_text_atomic(run.path / "loss_shapes.json", json.dumps(trainer.records.loss_shapes))
    write_results(run, results)
    print(f"{config.method}: test {metric} {results[f'test_{metric}']:.4f} (final), "
          f"{results[f'test_{metric}_at_best_val']:.4f} at the best validation {metric} (step "
          f"{results['best_val_step']}); results in {run.results}")
    return results
