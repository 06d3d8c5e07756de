"""Cost of one NPBML meta-iteration relative to one learn2learn MAML meta-iteration, and the share of
a meta-iteration spent sampling episodes (Omniglot 5-way 1-shot, 4-CONV, same inner steps and meta-batch).

Times are process CPU seconds (`time.process_time`, with one torch thread by default), so the figures
hold on a machine shared with other jobs; the variants run round-robin and the median is reported.
The convolution and matrix-multiply FLOPs of one meta-iteration (all passes: forward, backward and the
second-order backward) are counted too: their ratio is what the time ratio would be if nothing else cost.

    .venv/bin/python bench/bench_npbml.py --data-root ../shared/data --repeats 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from engine.config import build_config
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from tasks.episodes import EpisodeSampler
from tasks.fewshot_datasets import load_splits

TOP_TWO = {"adapted_blocks": 2}  # the reference code's layout: the top two blocks adapted, warped, FiLM-ed
VARIANTS = {  # name -> (method, components, model); the same backbone, inner steps and meta-batch for all
    "maml (learn2learn)": ("maml", {}, {}),
    "npbml init+warp, all blocks adapted": ("npbml", {"learned_loss": False, "film": False}, {}),
    "npbml init+loss, all blocks adapted": ("npbml", {"warp": False, "film": False}, {}),
    "npbml full, all blocks adapted": ("npbml", {}, {}),
    "npbml init+warp, top 2 adapted": ("npbml", {"learned_loss": False, "film": False}, TOP_TWO),
    "npbml init+loss, top 2 adapted": ("npbml", {"warp": False, "film": False}, TOP_TWO),
    "npbml full, top 2 adapted": ("npbml", {}, TOP_TWO),
}


def meta_iteration(learner: torch.nn.Module, sampler: EpisodeSampler, config: EpisodicConfig,
                   optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(CPU seconds sampling, CPU seconds in total) for one meta-iteration."""
    start = time.process_time()
    episodes = [sampler.sample() for _ in range(config.outer.meta_batch)]
    sampled = time.process_time()
    optimizer.zero_grad()
    for episode in episodes:
        loss, _ = learner(episode, config.inner.steps, train=True)
        (loss / config.outer.meta_batch).backward()
    optimizer.step()
    return sampled - start, time.process_time() - start


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the ops `torch.utils.flop_counter` knows (convolutions, matrix products).

    (`FlopCounterMode` itself cannot be used: its module hooks break `torch.autograd.grad` on leaves.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--transductive-shots", type=int, default=1,
                        help="query examples per class in NPBML's transductive loss term (15: the whole query)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sampler = EpisodeSampler(load_splits("omniglot", args.data_root)["train"], ways=5, shots=1, query=15)
    setups, flops = {}, {}
    for name, (method, components, model) in VARIANTS.items():
        inner = {"steps": args.steps, "lr": 0.4} if method == "maml" else \
            {"steps": args.steps, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
        inner["transductive_shots"] = args.transductive_shots
        config = build_config(EpisodicConfig, {"method": method, "components": components, "inner": inner,
                                               "model": model, "outer": {"meta_batch": args.meta_batch}})
        torch.manual_seed(0)
        learner = build_learner(config, (1, 28, 28))
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        meta_iteration(learner, sampler, config, optimizer)  # warm-up
        with FlopCount() as counter:
            meta_iteration(learner, sampler, config, optimizer)
        setups[name] = (learner, config, optimizer)
        flops[name] = counter.total
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (learner, config, optimizer) in setups.items():
            runs[name].append(meta_iteration(learner, sampler, config, optimizer))
    timings = {name: (statistics.median(s for s, _ in r), statistics.median(t for _, t in r))
               for name, r in runs.items()}
    base = timings["maml (learn2learn)"][1]
    print(f"| variant | CPU s / meta-iteration | ratio to MAML | conv+matmul GFLOP | FLOP ratio | sampling share |"
          f"  (threads={args.threads}, steps={args.steps}, meta-batch={args.meta_batch}, "
          f"transductive shots={args.transductive_shots}, median of {args.repeats})")
    print("|---|---|---|---|---|---|")
    for name, (sample, total) in timings.items():
        gflop, flop_ratio = flops[name] / 1e9, flops[name] / flops["maml (learn2learn)"]
        print(f"| {name} | {total:.3f} | {total / base:.2f} | {gflop:.1f} | {flop_ratio:.2f} | "
              f"{100 * sample / total:.2f}% |")


if __name__ == "__main__":
    main()
