"""Every GPU figure of the project from one command, sized for a short device loan (at most 8 minutes of wall time).

    .venv/bin/python bench/gpu_suite.py [--out runs/gpu_suite.json]     # on one CUDA GPU
    .venv/bin/python bench/gpu_suite.py --dry-run                        # the whole suite on the CPU, tiny shapes

Parts, each with its own time budget (a part measures what fits in its budget, at least one repeat of each row):
1. CE against AdaLFL steps (the loss updated at every step, k = 1, and at every k-th, the recommended
   `meta.update_every` of configs/adalfl_cifar.yaml) on ResNet-18 with CIFAR-10 shapes (the dry run: LeNet-5 on
   16x16 images, batch 8), batch 128: ms per step,
   images/s, peak memory and the ratio to the bare fp32 CE step, for fp32, bf16 autocast, channels-last, and
   torch.compile (CE only; AdaLFL's step runs eagerly); then the same on WRN-16-8 if the budget allows. Every row
   times blocks of k steps between synchronisations, as training runs them.
2. NPBML, MAML and Meta-SGD meta-iterations (4-CONV on Omniglot shapes, ResNet-12 on 84 px shapes), the task loop
   against `outer.vectorize_tasks`, meta-batch 4 and 32.
3. Correctness: AdaLFL's meta-gradient on the device (fp32 and bf16 autocast) against a float64 CPU computation of
   the same step on the same batch and weights (relative error of the loss network's gradient).
4. The projected wall time of configs/adalfl_cifar.yaml (its steps at its fast path, k = 1 and the recommended k)
   and of the reference NPBML schedule (60,000 meta-iterations, Omniglot meta-batch 32; task loop and vmap) from the
   measured steps.
Synthetic tensors of the real shapes (no data loading); every timing synchronised, rows interleaved, medians.
Prints markdown tables and writes every figure to a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from adalfl import AdaptiveLoss
from engine.config import build_config
from engine.errors import UserError
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from npbml.meta_trainer import meta_gradient
from tasks.episodes import Episode
from tasks.models import build_model

ROOT = Path(__file__).resolve().parent.parent
ADALFL_CONFIG = ROOT / "configs" / "adalfl_cifar.yaml"
REFERENCE_NPBML_ITERATIONS = 60_000  # the reference code's meta-training schedule (Omniglot meta-batch 32)


@dataclass(frozen=True)
class Sizes:
    """The shapes and budgets of a run: the real ones on a GPU, tiny ones for --dry-run."""

    model: str = "resnet18"  # the training-step model (WRN-16-8 follows it when the budget allows)
    image: tuple[int, int, int] = (3, 32, 32)
    batch: int = 128
    omniglot: tuple[int, int, int] = (1, 28, 28)
    mini_imagenet: tuple[int, int, int] = (3, 84, 84)
    filters: int = 64
    inner_steps: int = 5
    meta_batches: tuple[int, ...] = (4, 32)
    repeats: int = 10
    budgets_s: tuple[float, float, float, float] = (150.0, 90.0, 180.0, 30.0)  # parts 1, 1b (WRN), 2, 3
    compile_backend: str = "inductor"


DRY_RUN = Sizes(model="lenet5_relu", image=(3, 16, 16), batch=8, mini_imagenet=(3, 16, 16), filters=8, inner_steps=1,
                meta_batches=(1, 2), repeats=2, budgets_s=(20.0, 0.0, 20.0, 10.0), compile_backend="eager")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ran_out_of_memory(run: Callable[[], None], device: torch.device) -> bool:
    """Call `run` and synchronise; True when it ran out of device memory (the allocator's error, or the vectorised
    meta-batch's UserError raised from it), with the cache emptied; any other error propagates."""
    try:
        run()
        sync(device)
        return False
    except (torch.OutOfMemoryError, UserError) as error:
        if not (isinstance(error, torch.OutOfMemoryError) or isinstance(error.__cause__, torch.OutOfMemoryError)):
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True


def measure(rows: dict[str, Callable[[], None]], device: torch.device, repeats: int, budget_s: float
            ) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each row (rows interleaved, each call synchronised) and its peak memory (CUDA):
    `repeats` rounds or as many as fit in `budget_s`, at least one after a warm-up call of each. A row that runs out
    of device memory is reported as such (no time; its peak is the allocator's high-water mark when it failed) and
    the others go on."""
    started = time.perf_counter()
    peaks: dict[str, float | None] = {}
    out_of_memory: set[str] = set()
    for name, run in rows.items():
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
        if ran_out_of_memory(run, device):  # warm-up (and compilation)
            out_of_memory.add(name)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(repeats):
        if round_ and time.perf_counter() - started > budget_s:
            break
        for name, run in rows.items():
            if name in out_of_memory:
                continue
            sync(device)
            begin = time.perf_counter()
            if ran_out_of_memory(run, device):
                out_of_memory.add(name)
                continue
            times[name].append(time.perf_counter() - begin)
    for name in sorted(out_of_memory):
        print(f"{name}: out of memory", flush=True)
    return {name: {"seconds": None, "peak_mb": peaks[name], "repeats": 0, "note": "out of memory"}
            if name in out_of_memory else
            {"seconds": statistics.median(times[name]), "peak_mb": peaks[name], "repeats": len(times[name]), "note": ""}
            for name in rows}


def training_steps(model_name: str, sizes: Sizes, device: torch.device, update_every: int
                   ) -> dict[str, Callable[[], None]]:
    """One call per row: a block of `update_every` training steps (bare CE steps, or AdaLFL steps with the loss
    updated at every step or at the block's first), for each fast-path option. Every row runs the same number of steps
    between synchronisations, as a training loop with no per-step host sync does: a row of single synchronised steps
    would pay the launch latency that back-to-back steps hide."""
    rows: dict[str, Callable[[], None]] = {}
    options = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "channels-last": (None, True),
               "bf16 + channels-last": (torch.bfloat16, True)}
    ks = sorted({1, update_every})
    for option, (amp, channels_last) in options.items():
        for kind in ["CE", *(f"AdaLFL k={k}" for k in ks)]:
            rows[f"{kind}, {option}"] = step_block(model_name, sizes, device, kind, amp, channels_last, False,
                                                   update_every)
    rows["CE, torch.compile"] = step_block(model_name, sizes, device, "CE", None, False, True, update_every)
    return rows


def step_block(model_name: str, sizes: Sizes, device: torch.device, kind: str, amp: torch.dtype | None,
               channels_last: bool, compiled: bool, steps: int) -> Callable[[], None]:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name, sizes.image, 10).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(sizes.batch, *sizes.image, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (sizes.batch,), device=device)
    if kind.startswith("AdaLFL"):
        loss = AdaptiveLoss(num_outputs=10, amp=amp, update_every=int(kind.split("=")[1])).to(device)

        def adalfl() -> None:
            for _ in range(steps):
                loss.step(model, optimizer, (x, y))
        return adalfl
    forward = torch.compile(model, backend=sizes.compile_backend) if compiled else model

    def bare() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp is not None):
                outputs = forward(x)
            F.cross_entropy(outputs.float(), y).backward()
            optimizer.step()
    return bare


def step_table(model_name: str, timings: dict[str, dict[str, Any]], sizes: Sizes, block: int
               ) -> list[dict[str, Any]]:
    """Per-step figures of rows that each time a block of `block` steps."""
    base = timings["CE, fp32"]["seconds"]
    rows = []
    for name, t in timings.items():
        measured = t["seconds"] is not None
        per_step = t["seconds"] / block if measured else None
        rows.append({"model": model_name, "row": name, "ms_per_step": 1000 * per_step if measured else None,
                     "images_per_s": sizes.batch / per_step if measured else None,
                     "ratio_to_ce_fp32": t["seconds"] / base if measured and base is not None else None,
                     "peak_mb": t["peak_mb"], "repeats": t["repeats"], "note": t["note"]})
    return rows


def episodic_config(method: str, backbone: str, meta_batch: int, vectorize: bool, sizes: Sizes) -> EpisodicConfig:
    inner = {"steps": sizes.inner_steps, "lr": 0.4} if method != "npbml" else \
        {"steps": sizes.inner_steps, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    return build_config(EpisodicConfig, {
        "method": method, "inner": inner,
        "model": {"backbone": backbone, "filters": sizes.filters, **({"adapted_blocks": 2} if method == "npbml"
                                                                        else {})},
        "outer": {"meta_batch": meta_batch, "vectorize_tasks": vectorize}})


def meta_iterations(sizes: Sizes, device: torch.device) -> dict[str, Callable[[], None]]:
    """One meta-iteration (inner loops, second-order meta-gradient, Adam step) per row, on generated 5-way 1-shot
    episodes with 15 queries per class."""
    rows = {}
    for backbone, shape in (("conv4", sizes.omniglot), ("resnet12", sizes.mini_imagenet)):
        for method in ("maml", "metasgd", "npbml"):
            for meta_batch in sizes.meta_batches:
                for vectorize in (False, True):
                    config = episodic_config(method, backbone, meta_batch, vectorize, sizes)
                    name = f"{method}, {backbone}, meta-batch {meta_batch}, {'vmap' if vectorize else 'task loop'}"
                    rows[name] = meta_iteration(config, shape, device, sizes.inner_steps)
    return rows


def meta_iteration(config: EpisodicConfig, shape: tuple[int, int, int], device: torch.device, steps: int
                   ) -> Callable[[], None]:
    torch.manual_seed(0)
    learner = build_learner(config, shape).to(device)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    labels = torch.arange(5, device=device)
    episodes = [Episode(torch.rand(5, *shape, device=device), labels, torch.rand(75, *shape, device=device),
                        labels.repeat_interleave(15)) for _ in range(config.outer.meta_batch)]

    def iteration() -> None:
        optimizer.zero_grad()
        meta_gradient(learner, params, episodes, steps, device, vectorized=config.outer.vectorize_tasks)
        optimizer.step()
    return iteration


def meta_gradient_error(sizes: Sizes, device: torch.device, amp: torch.dtype | None) -> float:
    """Relative error of the loss network's meta-gradient of one AdaLFL step on `device` (fp32, or under `amp`)
    against the same step in float64 on the CPU."""
    torch.manual_seed(0)
    model = build_model(sizes.model, sizes.image, 10)
    loss = AdaptiveLoss(num_outputs=10)
    with torch.no_grad():  # a non-zero output layer, so that the meta-gradient has more than the residual part
        for p in loss.loss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(sizes.batch, *sizes.image), torch.randint(0, 10, (sizes.batch,))

    def gradient(dtype: torch.dtype, where: torch.device, autocast: torch.dtype | None) -> torch.Tensor:
        net, adaptive = copy.deepcopy(model).to(where, dtype), copy.deepcopy(loss).to(where)
        adaptive.loss.to(dtype)
        adaptive.amp = autocast
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        adaptive.step(net, optimizer, (x.to(where, dtype), y.to(where)), adapt=True)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                          for p in adaptive.loss.parameters()])

    reference = gradient(torch.float64, torch.device("cpu"), None)
    measured = gradient(torch.float32, device, amp)
    return float((measured - reference).norm() / reference.norm())


def recommended_update_every() -> int:
    """The `meta.update_every` of configs/adalfl_cifar.yaml: the k a user's first AdaLFL run uses."""
    return int(yaml.safe_load(ADALFL_CONFIG.read_text()).get("meta", {}).get("update_every", 1))


def projections(steps: list[dict[str, Any]], episodic: dict[str, dict[str, float | None]], k: int, model: str
                ) -> list[dict[str, Any]]:
    """Projected wall time of the paper configs from the measured rows of `model` (training steps only)."""
    config = yaml.safe_load(ADALFL_CONFIG.read_text())
    total = config["train"]["steps"] + config["meta"]["init_steps"]
    resnet = {r["row"]: r for r in steps if r["model"] == model}
    rows = []
    for kind in sorted({"AdaLFL k=1", f"AdaLFL k={k}"}):
        fast = resnet[f"{kind}, channels-last"]  # what train.amp / channels_last: auto give AdaLFL on CUDA
        if fast["ms_per_step"] is None:
            continue
        rows.append({"run": f"configs/adalfl_cifar.yaml, {kind} (channels-last, {model} steps)",
                     "hours": total * fast["ms_per_step"] / 3.6e6})
    for mode in ("task loop", "vmap"):
        npbml = [v for name, v in episodic.items() if name.startswith("npbml, conv4") and name.endswith(mode)
                 and v["seconds"] is not None]
        if npbml:
            rows.append({"run": f"NPBML reference schedule ({REFERENCE_NPBML_ITERATIONS:,} meta-iterations, conv4, "
                                f"the largest measured meta-batch, {mode})",
                         "hours": REFERENCE_NPBML_ITERATIONS * npbml[-1]["seconds"] / 3600})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the whole suite on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_suite.json", help="the JSON file to write")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: bench/gpu_suite.py measures a CUDA GPU and none is visible here; run it on a GPU machine, or "
              "add --dry-run to run the whole suite on the CPU with tiny shapes", file=sys.stderr)
        return 2
    sizes, device = (DRY_RUN, torch.device("cpu")) if args.dry_run else (Sizes(), torch.device("cuda"))
    started, k = time.perf_counter(), recommended_update_every()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"# GPU suite: {name}, torch {torch.__version__}, recommended update_every {k}\n", flush=True)
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "dry_run": args.dry_run, "update_every": k}

    steps = step_table(sizes.model, measure(training_steps(sizes.model, sizes, device, k), device, sizes.repeats,
                                            sizes.budgets_s[0]), sizes, k)
    if sizes.budgets_s[1] and time.perf_counter() - started + sizes.budgets_s[1] <= sum(sizes.budgets_s[:2]):
        steps += step_table("wrn16_8", measure(training_steps("wrn16_8", sizes, device, k), device, sizes.repeats,
                                               sizes.budgets_s[1]), sizes, k)
    else:
        print("WRN-16-8 skipped: part 1 left no budget for it\n")
    print(f"## Training steps (batch {sizes.batch})\n\n{table(steps)}\n", flush=True)
    episodic = measure(meta_iterations(sizes, device), device, sizes.repeats, sizes.budgets_s[2])
    episodic_rows = [{"meta-iteration": n, "seconds": v["seconds"], "repeats": v["repeats"], "peak_mb": v["peak_mb"],
                      "note": v["note"]} for n, v in episodic.items()]
    print(f"## Meta-iterations (5-way 1-shot, {sizes.inner_steps} inner steps)\n\n{table(episodic_rows)}\n", flush=True)
    correctness = [{"autocast": label, "relative error vs float64 CPU": meta_gradient_error(sizes, device, amp)}
                   for label, amp in (("fp32", None), ("bf16", torch.bfloat16))]
    print(f"## AdaLFL meta-gradient on {device.type}\n\n{table(correctness)}\n")
    projected = projections(steps, episodic, k, sizes.model)
    print(f"## Projected wall time (training steps only)\n\n{table(projected)}\n")
    total = time.perf_counter() - started
    print(f"total wall time: {total:.0f} s")
    report |= {"steps": steps, "meta_iterations": episodic_rows, "meta_gradient": correctness,
               "projections": projected, "total_s": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
