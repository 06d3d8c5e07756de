"""SparseLSR against dense label smoothing (F.cross_entropy(label_smoothing=a)), side by side.

    .venv/bin/python bench/bench_sparse_lsr.py [--batch 1024] [--repeats 50] [--device cpu|cuda]

Forward + backward of the loss on (batch, C) logits at C = 10, 100, 1000: median time of each, their ratio,
and the peak tensor memory of one call of each beyond the logits (PyTorch profiler on CPU,
torch.cuda.max_memory_allocated on GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from adalfl.sparse_lsr import sparse_label_smoothing

SMOOTHING = 0.1


def peak_memory(call, device: torch.device) -> float:
    """Peak bytes of tensor memory allocated during one `call`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        call()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return float(max(sum(s) for s in sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {args.batch}")
    print("| C | dense LS (ms) | SparseLSR (ms) | time ratio | dense peak (MB) | SparseLSR peak (MB) | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for classes in (10, 100, 1000):
        torch.manual_seed(0)
        logits = torch.randn(args.batch, classes, device=device, requires_grad=True)
        targets = torch.randint(0, classes, (args.batch,), device=device)
        calls = {
            "dense": lambda z=logits, y=targets: F.cross_entropy(z, y, label_smoothing=SMOOTHING).backward(),
            "sparse": lambda z=logits, y=targets: sparse_label_smoothing(z, y, SMOOTHING).backward(),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.repeats):  # interleaved
            for kind, call in calls.items():
                logits.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[kind].append(time.perf_counter() - started)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        memory = {}
        for kind, call in calls.items():
            logits.grad = None
            memory[kind] = peak_memory(call, device) / 2**20
        print(f"| {classes} | {ms['dense']:.3f} | {ms['sparse']:.3f} | {ms['sparse'] / ms['dense']:.2f} "
              f"| {memory['dense']:.2f} | {memory['sparse']:.2f} | {memory['sparse'] / memory['dense']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
