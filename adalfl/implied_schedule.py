"""The learning-rate schedule a learned loss implied: a control for AdaLFL (is it more than a schedule?).

A learned loss whose parameter gradient is k times cross-entropy's moves the model like cross-entropy at
k times the learning rate, up to direction. `ImpliedSchedule` replays the gradient-norm ratios an earlier
run recorded (results.json `readouts`, every `log.scalars_every` steps) as a learning-rate multiplier on
top of the MultiStep schedule, so that cross-entropy can be trained with the scale the learned loss chose.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

from engine.errors import ConfigError


class ImpliedSchedule:
    """lr multiplier at step k: decay^(milestones passed) x the ratio of the latest readout at or before k
    (the first readout's before any). A picklable callable for torch.optim.lr_scheduler.LambdaLR."""

    def __init__(self, steps: list[int], ratios: list[float], milestones: list[int], decay: float) -> None:
        self.steps, self.ratios = steps, ratios
        self.milestones, self.decay = sorted(milestones), decay

    def __call__(self, step: int) -> float:
        index = max(bisect.bisect_right(self.steps, step) - 1, 0)
        return self.decay ** bisect.bisect_right(self.milestones, step) * self.ratios[index]


def load_implied_schedule(path: str, milestones: list[int], decay: float) -> ImpliedSchedule:
    """The schedule of the run whose results.json is at `path`; a clear error when it has no readouts."""
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    try:
        readouts = json.loads(file.read_text())["readouts"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"optimizer.lr_multipliers_from = {path}: cannot read the readouts of a finished "
                          f"run there ({exc.__class__.__name__}); give the run folder or results.json of a run "
                          "with a learned loss (ml3, adalfl, taylorglo)") from None
    pairs = [(r["step"], r["grad_norm_ratio"]) for r in readouts if math.isfinite(r.get("grad_norm_ratio", math.nan))]
    if not pairs:
        raise ConfigError(f"optimizer.lr_multipliers_from = {path}: the run recorded no gradient-norm ratios; "
                          "give a run with a learned loss (ml3, adalfl, taylorglo)")
    steps, ratios = (list(v) for v in zip(*sorted(pairs), strict=True))
    return ImpliedSchedule(steps, ratios, milestones, decay)
