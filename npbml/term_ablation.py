"""Which learned-loss terms a trained NPBML model's adaptation relies on: meta-test it with terms left out.

    python -m npbml.term_ablation runs/<npbml run> [--tasks 600] [--data-root ../shared/data]

Loads the run's config and best model, then meta-tests it on the run's own fixed meta-test tasks (those of its
results.json) with the full task-adaptive loss M (CE + L_S + L_Q + R, or the terms the run has), with
cross-entropy alone, and with each learned term left out in turn. Nothing is re-trained: the initialisation, warp
and FiLM layers stay those learned with the full loss, and in every variant the inner loop's batch still holds the
transductive query examples of a run with L_Q (batch norm and FiLM see them; only the loss terms change). Prints
a table and writes term_ablation.json into the run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.config import build_config, load_yaml
from engine.device import resolve_device
from engine.distributed import device_for
from engine.errors import UserError
from engine.experiment import resolve_data_root
from engine.run_dir import existing_run_dir, write_text_atomic
from npbml.config import EpisodicConfig
from npbml.learners import build_learner
from npbml.meta_trainer import episode_samplers, evaluate, fixed_episodes, mean_ci95

SYMBOLS = {"support": "L_S", "query": "L_Q", "regulariser": "R"}


def variants(learned: list[str]) -> dict[str, tuple[str, ...]]:
    """{variant name: the terms it leaves out}: the full loss, CE alone, and each learned term left out in turn."""
    return {"full": (), "ce only": tuple(learned), **{f"without {SYMBOLS[t]}": (t,) for t in learned}}


def ablate(run_path: Path, tasks: int, data_root: str | None) -> dict[str, dict[str, float]]:
    """{variant: {"accuracy", "ci95"}} on the run's first `tasks` meta-test tasks."""
    run = existing_run_dir(run_path)
    data = load_yaml(run.config)
    data.pop("world_size", None)
    config = build_config(EpisodicConfig, data) if data.get("method") == "npbml" else None
    if config is None or not config.components.learned_loss:
        raise UserError(f"{run_path} is not an NPBML run with the learned loss (components.learned_loss: true); "
                        "pass the folder of such a run")
    if not run.best_checkpoint.is_file():
        raise UserError(f"{run.best_checkpoint} is missing: the run has not meta-validated yet; finish or resume it "
                        f"with: python train.py --resume {run_path}")
    samplers = episode_samplers(config, resolve_data_root(data_root, config.data.root))
    in_shape = tuple(samplers["train"].taskset.dataset[0][0].shape)
    device = resolve_device(device_for(config.device))
    learner = build_learner(config, in_shape).to(device)
    try:
        learner.load_state_dict(load_checkpoint(run.best_checkpoint)["learner"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{run.best_checkpoint} does not fit the model {run.config} describes ({exc}); pass the "
                        "folder the run was trained in, with its own config.yaml and best.pt") from None
    results = {}
    for name, left_out in variants(list(learner.loss.nets)).items():
        with learner.loss.leaving_out(*left_out):
            accuracies = evaluate(learner, fixed_episodes(config, samplers["test"], "test", tasks),
                                  config.eval_steps, device)
        accuracy, ci95 = mean_ci95(accuracies)
        results[name] = {"accuracy": accuracy, "ci95": ci95}
    write_text_atomic(run.path / "term_ablation.json", json.dumps({"tasks": tasks, "variants": results}, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an NPBML run folder (with best.pt)")
    parser.add_argument("--tasks", type=int, default=600, help="meta-test tasks (the run's first ones)")
    parser.add_argument("--data-root", help="folder holding the data sets (default: as for train.py)")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks {args.tasks}: meta-test at least 1 task")
    try:
        results = ablate(args.run, args.tasks, args.data_root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"| loss at meta-test | accuracy ({args.tasks} tasks, 95 % CI) |\n|---|---|")
    for name, result in results.items():
        print(f"| {name} | {100 * result['accuracy']:.2f} +- {100 * result['ci95']:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
