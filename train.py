"""Train one experiment from a YAML config: online AdaLFL on one task, or episodic meta-training.

    python train.py --config configs/adalfl_cifar.yaml
    python train.py --config configs/adalfl_mnist.yaml --set train.steps=2000 --set name=quick
    python train.py --resume runs/quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adalfl import config as single_task
from adalfl import single_task_run
from engine.errors import UserError
from engine.experiment import Family, run_experiment
from engine.interrupt import RunInterrupted
from engine.run_loop import Stop
from npbml import config as episodic
from npbml import meta_trainer as episodic_trainer

FAMILIES = (  # every kind of experiment train.py runs, told apart by the config's method
    Family(single_task.METHODS, single_task.SingleTaskConfig, single_task_run.train, single_task_run.HPARAMS),
    Family(episodic.METHODS, episodic.EpisodicConfig, episodic_trainer.train, episodic_trainer.HPARAMS),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML experiment config (see configs/)")
    parser.add_argument("--resume", type=Path, help="run folder to continue from its last checkpoint")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500 (repeatable)",
    )
    parser.add_argument("--data-root", help="folder holding the data sets (default: $META_DATA_ROOT, then ./data)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run folders go")
    parser.add_argument("--take-over", action="store_true",
                        help="with --resume: remove the lock a killed run left (never a running one's)")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.resume is None):
        parser.error("give exactly one of --config (a new run) or --resume (an existing run folder)")
    return args


def main(argv: list[str] | None = None, stop: Stop | None = None) -> int:
    """train.py's command line; `stop` (default: Ctrl-C / SIGTERM) asks the run to stop at a step boundary."""
    args = parse_args(argv)
    try:
        run_experiment(
            FAMILIES,
            config_path=args.config,
            resume=args.resume,
            overrides=args.overrides,
            data_root=args.data_root,
            runs_root=args.runs_root,
            take_over=args.take_over,
            stop=stop,
        )
    except UserError as exc:  # every rank of a torchrun world hits it; rank 0 says it, each exits with 2
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted; the last checkpoint is kept: continue with {stopped.resume}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the run started; there is nothing to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
