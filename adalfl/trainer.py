"""The state of a single-task run (handcrafted, searched, offline-learned or online-adapted loss): the base model,
its optimizer and schedule, the learned loss or the search, the records; with the building blocks every phase uses
(fresh base models, batches by random stream, evaluation, checkpoints, logging). The phases themselves run in
adalfl/single_task_run.py."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from adalfl.adaptive_loss import AdaptiveLoss, regression_loss
from adalfl.config import SingleTaskConfig
from adalfl.implied_schedule import load_implied_schedule
from adalfl.loss_network import OutputWiseLoss
from adalfl.loss_search import LOSS_SEARCHES, LossSearch
from adalfl.methods import METHOD_SPECS
from adalfl.online_step import LossFn, StepStats
from adalfl.readouts import LossReadouts
from adalfl.sparse_lsr import sparse_label_smoothing
from engine.checkpoint import save_checkpoint
from engine.compute_clock import ComputeClock
from engine.device import resolve_device
from engine.distributed import (
    EventWriter,
    all_reduce_mean_,
    all_reduce_sum_,
    check_divisible,
    device_for,
    gather_objects,
    shard,
    world,
)
from engine.errors import ConfigError, NonFiniteError
from engine.nonfinite_guard import NonFiniteGuard
from engine.rng import rng_state, seed_everything, set_rng_state, step_generator
from engine.run_dir import RunDir
from engine.run_estimate import BAR_FORMAT, RunEta
from engine.selection import best_validation
from engine.tags import TEST, VAL
from tasks.models import build_model
from tasks.supervised import SupervisedTask, batch_indices, load_task


class SingleTaskTrainer:
    """Holds every piece of state of a single-task run, so that it can be checkpointed and resumed."""

    def __init__(self, config: SingleTaskConfig, run: RunDir, data_root: Path) -> None:
        self.config, self.run, self.world = config, run, world()
        self.device = resolve_device(device_for(config.device))
        seed_everything(config.seed)
        self.task: SupervisedTask = load_task(
            config.data.dataset, data_root, config.data.val_fraction, seed=config.seed, augment=config.data.augment
        ).to(self.device)
        self.spec = METHOD_SPECS[config.method]
        self._check_method_fits_task()
        self.task_loss: LossFn = F.cross_entropy if self.task.kind == "classification" else regression_loss
        self.handcrafted_loss: LossFn = {
            "label_smoothing": functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing),
            "sparse_lsr": functools.partial(sparse_label_smoothing, smoothing=config.label_smoothing),
        }.get(self.spec.loss, self.task_loss)
        self.learns_loss = self.spec.learns_loss
        self.prediction = "softmax" if self.task.kind == "classification" else "identity"
        self._check_fits_world()
        cuda = self.device.type == "cuda"
        train = config.train
        self.amp = train.autocast_dtype(cuda, self.learns_loss)
        self.channels_last = len(self.task.input_shape) == 3 and (
            train.channels_last == "on" or (train.channels_last == "auto" and cuda))

        self.model, self.optimizer, self.scheduler = self.fresh_base(stream=0)
        self.adaptive: AdaptiveLoss | None = None
        self.loss_net: OutputWiseLoss | None = None  # the learned or searched loss in use, for readouts
        if self.learns_loss:
            self.adaptive = AdaptiveLoss(
                self.task.num_outputs, self.task.kind, hidden=config.loss_network.hidden,
                beta=config.loss_network.beta, gamma=config.loss_network.gamma, form=config.meta.loss_form,
                meta_lr=config.meta.lr, max_grad_ratio=config.meta.grad_ratio(config.method),
                meta_clip=config.meta.clip_grad_norm, amp=self.amp, grad_scale=config.meta.grad_scale,
                update_every=config.meta.update_every, keep_outputs=config.meta.keep_outputs,
            ).to(self.device)
            self.loss_net = self.adaptive.loss
        self.search: LossSearch | None = LOSS_SEARCHES[self.spec.search](self) if self.spec.search else None
        self.init_step = 0 if self.learns_loss else config.meta.init_steps
        self.init_model: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.clock = ComputeClock()  # training steps only
        self.metric = "error" if self.task.kind == "classification" else "mse"
        self.records = LossReadouts(self.task_loss, self.task.kind == "classification", self.adaptive)
        # the message names the phase where there are two: phase 1's offline meta steps, phase 2's steps
        self.init_guard = NonFiniteGuard("phase-1 meta step")
        self.guard = NonFiniteGuard("phase-2 step" if self.learns_loss else "step")
        self.meta_stats: StepStats | None = None  # the latest step that updated the loss (meta.update_every)
        self.bar: tqdm | None = None
        self.eta = RunEta()  # the whole run's remaining time, shown in the bar
        if self.world.rank:  # every rank built the same models; from here on each draws its own dropout masks
            seed_everything(config.seed + self.world.rank)

    def _check_method_fits_task(self) -> None:
        if self.task.kind not in self.spec.tasks:
            raise ConfigError(f"method {self.config.method} needs a {self.spec.tasks[0]} data set; {self.task.name} "
                              f"is {self.task.kind}: use {self.spec.instead}")

    def _check_fits_world(self) -> None:
        """Under torchrun: every batch splits evenly over the ranks; SyncBatchNorm only where it can run."""
        cfg = self.config
        for split in ("train", "val") if cfg.meta.batch_source == "validation" else ("train",):
            check_divisible(min(cfg.train.batch_size, self.task.size(split)), f"examples per {split} batch",
                            "train.batch_size")
        if cfg.train.sync_batchnorm and self.world.distributed:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_batchnorm needs CUDA (torch's SyncBatchNorm runs on GPUs only); set it "
                                  "to false: on the CPU each rank normalises over its own share of the batch")
            if self.learns_loss:
                raise ConfigError(f"train.sync_batchnorm does not fit method {cfg.method}: its forward-mode product "
                                  "does not pass through SyncBatchNorm; set it to false (each rank then normalises "
                                  "over its own share of the batch)")

    def describe_device(self) -> str:
        """The device line printed at the start: where the run runs and which fast-path options are on."""
        options = [name for name, on in (("bf16 autocast", self.amp is not None),
                                         ("channels-last", self.channels_last),
                                         ("compiled", self.config.train.compile and not self.learns_loss)) if on]
        line = f"{self.config.method} on {self.device}"
        if self.world.distributed:
            line += f" x {self.world.size} processes"
        if options:
            line += f" ({', '.join(options)})"
        if self.config.train.compile and self.learns_loss:
            line += (f"; train.compile is ignored for {self.config.method}: its step runs the model through "
                     "torch.func (a forward-mode product at the old parameters), which runs eagerly")
        return line

    def advice(self) -> str:
        """What to lower (only settings this method has) and, truthfully, what checkpoint is kept."""
        settings = [f"optimizer.lr (now {self.config.optimizer.lr:g})"]
        if self.learns_loss:
            settings.insert(0, f"meta.lr (now {self.config.meta.lr:g})")
        kept = (f"the last good checkpoint is kept in {self.run.checkpoint}" if self.run.checkpoint.is_file()
                else "no checkpoint had been written yet")
        return f"lower {' or '.join(settings)} and start a new run; {kept}"

    def check_finite(self) -> None:
        """Raise NonFiniteError if a step since the start recorded a non-finite loss or meta-gradient."""
        for guard in (self.init_guard, self.guard):
            guard.check("the training loss or the learned loss's meta-gradient", self.advice())

    # ----- building blocks -------------------------------------------------------------------
    def fresh_base(self, stream: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """A newly initialised base model (seeded by `stream`), its optimizer and schedule (for the trained
        model, stream 0, the schedule an earlier run's learned loss implied when optimizer.lr_multipliers_from)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1_000_003 + stream)
            model = build_model(self.config.model.name, self.task.input_shape, self.task.num_outputs)
        if self.config.train.sync_batchnorm and self.world.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last
                         else torch.preserve_format)
        if self.config.train.compile and not self.learns_loss:
            model.compile()
        opt = self.config.optimizer
        optimizer = opt.build(model.parameters())
        if opt.lr_multipliers_from is not None and stream == 0:
            schedule = load_implied_schedule(opt.lr_multipliers_from, opt.milestones, opt.lr_decay)
            return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt.milestones, gamma=opt.lr_decay)
        return model, optimizer, scheduler

    def batch(self, split: str, step: int, stream: int, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` of `split` in random stream `stream`, augmented when from train: under torchrun
        this rank's share of it, unless `whole`."""
        size = self.task.size(split)
        batch_size = min(self.config.train.batch_size, size)
        indices = batch_indices(size, batch_size, self.config.seed * 7919 + stream, step)
        rank = 0 if whole else self.world.rank
        generator = step_generator(self.config.seed, step, stream, rank) if split == "train" else None
        inputs, targets = self.task.batch(split, indices if whole else shard(indices), generator, device=self.device)
        return self._memory_format(inputs), targets

    def _memory_format(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs

    def meta_batch(self, batch: tuple[torch.Tensor, torch.Tensor], step: int, stream: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta batch for the step taken on `batch`, from `meta.batch_source`."""
        source = self.config.meta.batch_source
        if source == "same":
            return batch
        return self.batch("val" if source == "validation" else "train", step, stream)


    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Error rate (classification) or MSE (regression) and the task loss over a whole split (under torchrun
        each rank scores every world-size-th chunk and the sums are all-reduced)."""
        model.eval()
        size, chunk = self.task.size(split), self.config.train.eval_batch_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, errors
        for start in range(chunk * self.world.rank, size, chunk * self.world.size):
            inputs, targets = self.task.batch(split, torch.arange(start, min(start + chunk, size)), device=self.device)
            outputs = model(self._memory_format(inputs))
            totals[0] += self.task_loss(outputs, targets).double() * targets.shape[0]
            if self.metric == "error":
                totals[1] += (outputs.argmax(dim=1) != targets).sum()
        model.train()
        all_reduce_sum_([totals])
        loss, errors = (totals / size).tolist()
        return {"loss": loss, self.metric: errors if self.metric == "error" else loss}

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step, "init_step": self.init_step, "history": self.history,
            **self.records.state_dict(),
            "clock": self.clock.state_dict(), "world_size": self.world.size,
            "rng": gather_objects(rng_state()),
            "search": self.search.state_dict() if self.search is not None else None,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        if self.init_model is not None:
            model, optimizer, scheduler = self.init_model
            state["init_model"] = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.init_step = state["step"], state["init_step"]
        self.history = state["history"]
        self.clock.load_state_dict(state["clock"])
        self.records.load_state_dict(state)
        if self.search is not None:
            self.search.load_state_dict(state["search"])
        if self.search is not None and self.search.generation == self.search.generations:
            self.loss_net = self.search.best_loss()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        if "init_model" in state:
            self.init_model = self.fresh_base(stream=0)
            for part, saved in zip(self.init_model, state["init_model"], strict=True):
                part.load_state_dict(saved)
        set_rng_state(state["rng"][self.world.rank])

    def save(self) -> None:
        """Checkpoint the run, unless a step was not finite or a parameter is no longer finite (then the last
        good one stays)."""
        self.check_finite()
        models = [self.model, self.loss_net, self.init_model[0] if self.init_model else None]
        for model in filter(None, models):
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteError(f"parameters became non-finite by step {self.step}; {self.advice()}")
        state = self.state_dict()  # on every rank: it gathers the ranks' random states
        if self.world.is_main:
            save_checkpoint(self.run.checkpoint, state)

    # ----- logging ---------------------------------------------------------------------------
    def log_step(self, writer: EventWriter, group: str, step: int, stats: StepStats) -> dict[str, float]:
        """Write the step's scalars under tag `group`, averaged over the ranks (the one host sync of a logging
        interval, after the finite check); returns them for the progress bar."""
        self.check_finite()
        scalars = {"task_loss": stats.task_loss}
        if self.loss_net is not None:
            scalars["learned_loss"] = stats.train_loss
        meta = stats if stats.meta_loss is not None else self.meta_stats  # the latest loss update's
        if meta is not None:
            scalars["meta_loss"], scalars["meta_grad_norm"] = meta.meta_loss, meta.meta_grad_norm
        stacked = torch.stack([value.detach().float() for value in scalars.values()])
        all_reduce_mean_([stacked])
        values = dict(zip(scalars, stacked.tolist(), strict=True))
        for key, value in values.items():
            writer.add_scalar(f"{group}/{key}", value, step)
        return values

    def log_evaluation(self, writer: EventWriter) -> dict[str, float]:
        record: dict[str, float] = {"step": self.step}
        for split, group in (("val", VAL), ("test", TEST)):
            for key, value in self.evaluate(self.model, split).items():
                record[f"{split}_{key}"] = value
                writer.add_scalar(f"{group}/{key}", value, self.step)
        self.history.append(record)
        writer.add_scalar(f"{TEST}/{self.metric}_at_best_val",
                          best_validation(self.history, self.metric)[f"test_{self.metric}"], self.step)
        return record

    # ----- progress and the projected wall time ---------------------------------------------
    def progress_bar(self, description: str) -> tqdm:
        """The run's one step bar, phase 1 and phase 2 together, with the whole run's remaining time (`eta`)."""
        if self.bar is None:
            phase_1 = self.config.meta.init_steps if self.learns_loss else 0
            self.bar = tqdm(total=phase_1 + self.config.train.steps, unit="step", dynamic_ncols=True,
                            initial=(self.init_step if self.learns_loss else 0) + self.step,
                            disable=not self.world.is_main, bar_format=BAR_FORMAT)
        self.bar.set_description(description)
        return self.bar

    def close_progress_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
