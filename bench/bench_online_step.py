"""Cost of AdaLFL's online step against one bare cross-entropy step, measured side by side.

    .venv/bin/python bench/bench_online_step.py [--repeats 10] [--device cpu|cuda] [--models lenet5 allcnnc]

The baseline is the bare PyTorch step (zero_grad, forward, cross-entropy, backward, optimizer.step) with no
project code around it; the AdaLFL step is `AdaptiveLoss.step` with the same optimizer (SGD with Nesterov
momentum, or Adam), meta batch = the training batch (the default), the loss updated at every step (k = 1) or at
every k-th (`update_every`, k = 4 and 16: the mean step time over k consecutive steps). Prints, per model and
optimizer at batch 128: the median step time of each, each ratio to the bare step (targets: k = 1 SGD <= 3.0,
Adam <= 2.7; k = 4 <= 1.7; k = 16 <= 1.3) and the peak tensor memory of each (over k steps) and its ratio
(target <= 2.5). CPU memory comes from the PyTorch profiler's memory timeline, GPU memory from
torch.cuda.max_memory_allocated. All kinds run interleaved, so that they see the same machine state. On the CPU a
step's time is its process CPU time (run with OMP_NUM_THREADS=1: then other processes on the machine do not inflate
it); on a GPU, its wall time between device synchronisations. On glibc the script first stops the allocator from
handing freed memory back to the system (`mallopt`): otherwise whether a step pays for page faults depends on the
heap's history, not on the step (the bare SGD step on LeNet-5 measured 9.7 ms or 13-16 ms from run to run).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from adalfl import AdaptiveLoss
from tasks.models import build_model

CASES = [("lenet5", (1, 28, 28)), ("allcnnc", (3, 32, 32))]
OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4), 3.0),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-3), 2.7),
}


UPDATE_EVERY = {"adalfl": 1, "k=4": 4, "k=16": 16}  # AdaLFL kinds: the loss updated at every k-th step
KINDS = ("ce", *UPDATE_EVERY)


def make_step(name: str, shape: tuple[int, ...], optimizer_name: str, kind: str, device: torch.device,
              batch: int):
    """A closure running one block of training steps of a fresh model: one bare CE step, or k AdaLFL steps
    with the loss updated at the first (k = 1: every step)."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).to(device)
    optimizer = OPTIMIZERS[optimizer_name][0](model.parameters())
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    if kind in UPDATE_EVERY:
        k = UPDATE_EVERY[kind]
        loss = AdaptiveLoss(num_outputs=10, update_every=k).to(device)

        def adalfl() -> None:
            for _ in range(k):
                loss.step(model, optimizer, (x, y))

        return adalfl

    def bare() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return bare


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to their maximum, so that freed memory stays in the heap; False where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 2**25))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(step, device: torch.device) -> float:
    """Peak bytes of tensor memory during one call of `step`."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return float(max(sum(s) for s in sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=[name for name, _ in CASES], default=[n for n, _ in CASES],
                        help="the models to time (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    kept = keep_freed_memory()
    print(f"device: {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {args.batch} "
          f"| clock: {'process CPU time' if device.type == 'cpu' else 'wall time'} "
          f"| freed memory kept in the heap: {'yes' if kept else 'no (not glibc)'}")
    print("| model | optimizer | CE step (ms) | AdaLFL step (ms), k = 1 / 4 / 16 | time ratio k = 1 (target) "
          "| k = 4 (<= 1.7) | k = 16 (<= 1.3) | CE peak (MB) | AdaLFL peak (MB), k = 1 / 4 / 16 "
          "| memory ratio (<= 2.5) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in (case for case in CASES if case[0] in args.models):
        for optimizer_name, (_, target) in OPTIMIZERS.items():
            steps = {kind: make_step(name, shape, optimizer_name, kind, device, args.batch) for kind in KINDS}
            per_block = {kind: UPDATE_EVERY.get(kind, 1) for kind in KINDS}
            times: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for kind in KINDS:
                for _ in range(2):
                    steps[kind]()
            for _ in range(args.repeats):  # interleaved, so every kind sees the same machine state
                for kind in KINDS:
                    sync(device)
                    started = clock()
                    steps[kind]()
                    sync(device)
                    times[kind].append((clock() - started) / per_block[kind])
            ms = {kind: 1000 * statistics.median(values) for kind, values in times.items()}
            ratio = {kind: ms[kind] / ms["ce"] for kind in KINDS}
            memory = {kind: peak_memory(steps[kind], device) / 2**20 for kind in KINDS}
            adalfl = [kind for kind in KINDS if kind != "ce"]
            print(f"| {name} {shape} | {optimizer_name} | {ms['ce']:.1f} | "
                  f"{' / '.join(f'{ms[k]:.1f}' for k in adalfl)} | {ratio['adalfl']:.2f} (<= {target}) "
                  f"| {ratio['k=4']:.2f} | {ratio['k=16']:.2f} | {memory['ce']:.1f} "
                  f"| {' / '.join(f'{memory[k]:.1f}' for k in adalfl)} "
                  f"| {max(memory[k] for k in adalfl) / memory['ce']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
