"""The fast-path options side by side: step time and peak memory of a bare CE step, the project's CE step and the
AdaLFL step, with bf16 autocast and channels-last off and on.

    .venv/bin/python bench/bench_fast_path.py [--model resnet18] [--repeats 10] [--device cpu|cuda]

Batch 128 of CIFAR-10-sized random inputs, SGD with Nesterov momentum. The bare step is zero_grad, forward,
cross-entropy, backward, step with no project code (under autocast when the row's amp is on). Prints the median
step time of each (interleaved), images/s, the ratio to the bare float32 step, and on CUDA the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from adalfl import AdaptiveLoss
from adalfl.online_step import online_step
from tasks.models import build_model

BATCH, SHAPE = 128, (3, 32, 32)


def make_step(model_name: str, kind: str, amp: bool, channels_last: bool, device: torch.device):
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name, SHAPE, 10).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(BATCH, *SHAPE, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (BATCH,), device=device)
    dtype = torch.bfloat16 if amp else None
    if kind == "AdaLFL step":
        loss = AdaptiveLoss(num_outputs=10, amp=dtype).to(device)
        return lambda: loss.step(model, optimizer, (x, y))
    if kind == "project CE step":
        return lambda: online_step(model, F.cross_entropy, optimizer, (x, y), F.cross_entropy, amp=dtype)

    def bare() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        F.cross_entropy(outputs.float(), y).backward()
        optimizer.step()

    return bare


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    configs = [(amp, cl) for amp in (False, True) for cl in (False, True)]
    kinds = ("bare CE step", "project CE step", "AdaLFL step")
    steps = {(k, amp, cl): make_step(args.model, k, amp, cl, device) for k in kinds for amp, cl in configs}
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    memory: dict[tuple, float] = {}
    for step in steps.values():
        step()
        step()
    for _ in range(args.repeats):  # interleaved, so every row sees the same machine state
        for key, step in steps.items():
            sync(device)
            started = time.perf_counter()
            step()
            sync(device)
            times[key].append(time.perf_counter() - started)
    if device.type == "cuda":
        for key, step in steps.items():
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(device)
            memory[key] = torch.cuda.max_memory_allocated() / 2**20
    base = statistics.median(times[("bare CE step", False, False)])
    print(f"device: {device} | torch {torch.__version__} | {args.model} {SHAPE} | batch {BATCH} | "
          f"median of {args.repeats}")
    print("| step | bf16 autocast | channels-last | ms | images/s | / bare float32 step | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for (kind, amp, cl), values in times.items():
        ms = 1000 * statistics.median(values)
        peak = f"{memory[(kind, amp, cl)]:.0f}" if memory else "-"
        print(f"| {kind} | {'on' if amp else 'off'} | {'on' if cl else 'off'} | {ms:.1f} | {BATCH / ms * 1000:.0f} "
              f"| {ms / (1000 * base):.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
