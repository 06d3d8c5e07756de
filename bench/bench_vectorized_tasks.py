"""A meta-batch adapted task by task against the same meta-batch as one vmapped computation (`outer.vectorize_tasks`).

One meta-iteration (forward, second-order backward, Adam step) of MAML and of NPBML (the default layout: top two
blocks adapted, warp, task-adaptive loss, FiLM) on generated Omniglot-sized episodes (5-way 1-shot, 15 query, 28x28,
4-CONV with 64 filters, 5 inner steps), at meta-batch 4 and 32. The MAML baseline is learn2learn's own
`MAML.clone()` / `adapt()` loop with no project code around it; NPBML's baseline is its per-task loop. Variants run
round-robin in one process and the median wall time is reported.

    .venv/bin/python bench/bench_vectorized_tasks.py --repeats 5
    .venv/bin/python bench/bench_vectorized_tasks.py --profile   # where the MAML baseline's time goes
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.config import build_config
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from npbml.meta_trainer import meta_gradient
from tasks.episodes import Episode
from tasks.learn2learn_import import import_learn2learn

WAYS, SHOTS, QUERY, STEPS = 5, 1, 15, 5


def episodes(count: int, device: torch.device) -> list[Episode]:
    y = torch.arange(WAYS, device=device)
    return [Episode(torch.rand(WAYS * SHOTS, 1, 28, 28, device=device), y.repeat_interleave(SHOTS),
                    torch.rand(WAYS * QUERY, 1, 28, 28, device=device), y.repeat_interleave(QUERY))
            for _ in range(count)]


def config(method: str, vectorize: bool) -> EpisodicConfig:
    inner = {"steps": STEPS, "lr": 0.4} if method == "maml" else \
        {"steps": STEPS, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    return build_config(EpisodicConfig, {"method": method, "inner": inner, "outer": {"vectorize_tasks": vectorize},
                                         "model": {"adapted_blocks": 2} if method == "npbml" else {}})


def bare_maml_iteration(device: torch.device) -> Callable[[list[Episode]], None]:
    """learn2learn's MAML meta-iteration as its documentation writes it."""
    l2l = import_learn2learn()
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(build_learner(config("maml", False), (1, 28, 28)).algorithm.module.to(device), lr=0.4)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def iteration(tasks: list[Episode]) -> None:
        optimizer.zero_grad()
        for task in tasks:
            learner = maml.clone()
            for _ in range(STEPS):
                learner.adapt(F.cross_entropy(learner(task.support_x), task.support_y))
            (F.cross_entropy(learner(task.query_x), task.query_y) / len(tasks)).backward()
        optimizer.step()
    return iteration


def project_iteration(method: str, vectorize: bool, device: torch.device) -> Callable[[list[Episode]], None]:
    """The episodic trainer's meta-iteration (npbml/meta_trainer.py's meta_gradient, then Adam)."""
    torch.manual_seed(0)
    learner = build_learner(config(method, vectorize), (1, 28, 28)).to(device)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def iteration(tasks: list[Episode]) -> None:
        optimizer.zero_grad()
        meta_gradient(learner, params, tasks, STEPS, device, vectorized=vectorize)
        optimizer.step()
    return iteration


def profile_baseline(device: torch.device, tasks: int) -> None:
    """The operators of one learn2learn MAML meta-iteration, by self time."""
    iteration, batch = bare_maml_iteration(device), episodes(tasks, device)
    iteration(batch)  # warm-up
    with torch.profiler.profile() as profiler:
        iteration(batch)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta-batches", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's operator table of one baseline MAML meta-iteration instead")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile:
        profile_baseline(device, args.meta_batches[0])
        return
    pairs = {"maml": ("learn2learn loop (bare)", bare_maml_iteration(device),
                      "vectorised", project_iteration("maml", True, device)),
             "npbml": ("per-task loop", project_iteration("npbml", False, device),
                       "vectorised", project_iteration("npbml", True, device))}
    print(f"| method | meta-batch | baseline | s / meta-iteration | vectorised s / meta-iteration | speed-up |"
          f"  ({device}, {torch.get_num_threads()} threads, median of {args.repeats})")
    print("|---|---|---|---|---|---|")
    for tasks in args.meta_batches:
        batch = episodes(tasks, device)
        for method, (base_name, base, _, vectorised) in pairs.items():
            times: dict[str, list[float]] = {"base": [], "vectorised": []}
            for run in (base, vectorised):  # warm-up
                run(batch)
            for _ in range(args.repeats):
                for name, run in (("base", base), ("vectorised", vectorised)):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            b, v = statistics.median(times["base"]), statistics.median(times["vectorised"])
            print(f"| {method} | {tasks} | {base_name} | {b:.3f} | {v:.3f} | {b / v:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
