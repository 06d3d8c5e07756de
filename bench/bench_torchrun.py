"""Data-parallel throughput under torchrun: examples/s of the project's steps with 1 and N processes, beside
torch's own DistributedDataParallel cross-entropy step.

    .venv/bin/python bench/bench_torchrun.py [--processes 2] [--steps 30] [--device cpu|cuda]

Each configuration is launched with `torch.distributed.run` (gloo on CPU, nccl on GPU; one thread per process
on the CPU) and trains LeNet-5 on CIFAR-10-sized random data at a global batch of 128, split over the ranks.
Rows: the bare step (DistributedDataParallel around the model, plain cross-entropy, SGD with Nesterov momentum,
no project code), the project's cross-entropy step (`online_step`, its gradients all-reduced by
engine/distributed.py) and the AdaLFL step (`AdaptiveLoss.step`, with the meta-gradient all-reduced too).
Prints examples/s per world size and the speed-up over one process, and the project's CE step against the bare
DDP step at the same world size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from adalfl import AdaptiveLoss
from adalfl.online_step import online_step
from engine import distributed
from tasks.models import build_model

BATCH, SHAPE = 128, (3, 32, 32)
KINDS = ("bare DDP CE", "project CE", "project AdaLFL")


def make_step(kind: str, device: torch.device):
    """One training step on this rank's share of a fixed global batch."""
    torch.manual_seed(0)
    model = build_model("lenet5", SHAPE, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = distributed.shard(torch.randn(BATCH, *SHAPE)).to(device)
    y = distributed.shard(torch.randint(0, 10, (BATCH,))).to(device)
    if kind == "project AdaLFL":
        loss = AdaptiveLoss(num_outputs=10).to(device)
        return lambda: loss.step(model, optimizer, (x, y))
    if kind == "project CE":
        return lambda: online_step(model, F.cross_entropy, optimizer, (x, y), F.cross_entropy)
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                         else None)
               if distributed.world().distributed else model)

    def bare() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()

    return bare


def worker(steps: int, device_name: str) -> None:
    torch.set_num_threads(1)
    world = distributed.join(device_name)
    device = torch.device(distributed.device_for(device_name))
    rates = {}
    for kind in KINDS:
        step = make_step(kind, device)
        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            distributed.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        slowest = distributed.gather_objects(statistics.median(times))
        rates[kind] = BATCH / max(slowest)
    if world.is_main:
        print("RESULT " + json.dumps(rates), flush=True)
    distributed.leave()


def launch(processes: int, steps: int, device: str) -> dict[str, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--steps", str(steps), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.device)
        return
    rates = {n: launch(n, args.steps, args.device) for n in (1, args.processes)}
    print(f"device: {args.device} | torch {torch.__version__} | LeNet-5 {SHAPE} | global batch {BATCH} | "
          f"median of {args.steps} steps (slowest rank)")
    print(f"| step | examples/s, 1 process | examples/s, {args.processes} processes | speed-up "
          f"| {args.processes} processes: / bare DDP |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        one, many = rates[1][kind], rates[args.processes][kind]
        versus = many / rates[args.processes]["bare DDP CE"]
        print(f"| {kind} | {one:.0f} | {many:.0f} | {many / one:.2f}x | {versus:.2f} |")


if __name__ == "__main__":
    main()
