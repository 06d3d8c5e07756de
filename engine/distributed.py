"""Multi-process runs under torchrun: the process group, this process's place in it, and the few collectives the
trainers use.

`train.py` started by `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) joins the process group
torchrun set up: `nccl` when the run's device is CUDA, `gloo` on the CPU, plus a `gloo` group for control flags
(stop requests, which must not wait on a GPU stream). Without torchrun nothing is initialised, every collective
below returns at once and a run behaves exactly as a single process.

The trainers' steps are pure functions over parameter dicts (an unrolled step, a forward-mode product), which
`DistributedDataParallel`'s module hooks do not see; so gradients are all-reduced here explicitly, as one
flattened buffer per call.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.tensorboard import SummaryWriter

from engine.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes and this process's local rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, events, checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()
_control_group: Any = None


def world() -> World:
    """The world this process belongs to (a single process unless `join` was called under torchrun)."""
    return _world


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_name: str) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); `device_name` is the config's device."""
    global _world, _control_group
    if not launched_by_torchrun() or dist.is_initialized():
        return _world
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; set device: auto or cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started local rank {local_rank} but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node to the GPU count")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    _control_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank)
    return _world


def leave() -> None:
    """Destroy the process group (end of a run under torchrun)."""
    global _world, _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _world, _control_group = World(), None


def device_for(name: str) -> str:
    """The device string of this rank: `auto`/`cuda` become `cuda:<local rank>` under torchrun."""
    if _world.distributed and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return f"cuda:{_world.local_rank}"
    return name


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of `items` (its length a multiple of the world size)."""
    per_rank = len(items) // _world.size
    return items[_world.rank * per_rank:(_world.rank + 1) * per_rank]


def check_divisible(count: int, what: str, key: str) -> None:
    """`count` items split evenly over the ranks, or a ConfigError naming `key`."""
    if count % _world.size:
        raise ConfigError(f"{key} = {count} {what} do not split evenly over {_world.size} processes; set {key} "
                          f"to a multiple of {_world.size} or change torchrun's --nproc_per_node")


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place (one flattened all-reduce)."""
    if not _world.distributed or not tensors:
        return
    flat = _flatten_dense_tensors(list(tensors))
    dist.all_reduce(flat)
    flat /= _world.size
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, list(tensors)), strict=True):
        tensor.copy_(reduced)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over the ranks, in place (one flattened all-reduce)."""
    if not _world.distributed or not tensors:
        return
    flat = _flatten_dense_tensors(list(tensors))
    dist.all_reduce(flat)
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, list(tensors)), strict=True):
        tensor.copy_(reduced)


def differentiable_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks, differentiable in every rank's `x` (the backward all-reduces too)."""
    return dist_nn.all_reduce(x) if _world.distributed else x


def first_over_ranks(step: int) -> int:
    """The smallest non-negative value of `step` over the ranks, -1 when every rank has -1."""
    if not _world.distributed:
        return step
    value = torch.tensor([step if step >= 0 else 2**62], dtype=torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_control_group)
    return -1 if int(value) == 2**62 else int(value)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a CPU collective: no GPU stream waits on it)."""
    if not _world.distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(value)


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _world.distributed:
        return [obj]
    gathered: list[Any] = [None] * _world.size
    dist.all_gather_object(gathered, obj, group=_control_group)
    return gathered


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not _world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (e.g. rank 0 has written a file the others read)."""
    if _world.distributed:
        dist.barrier(group=_control_group)


class EventWriter:
    """TensorBoard's SummaryWriter on rank 0; on every other rank each call does nothing."""

    def __init__(self, log_dir: Any, **kwargs: Any) -> None:
        self._writer = SummaryWriter(log_dir, **kwargs) if _world.is_main else None

    def __getattr__(self, name: str) -> Any:
        if self._writer is None:
            return lambda *args, **kwargs: None
        return getattr(self._writer, name)

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
