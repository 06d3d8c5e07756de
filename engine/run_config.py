"""The settings every run has, whatever its family; each family's config extends `RunConfig`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import require


@dataclass
class RunConfig:
    method: str  # each family narrows it to its own methods
    name: str | None = None  # run folder name under runs/; default <config>-<date>-<time>
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:<index>
    threads: int | None = None  # torch CPU threads, set for every family when the run starts; null: torch's default
    # processes the run needs (torchrun --nproc_per_node N; compare.py --launcher slurm starts a cell so); a start
    # with another number is refused. null: as many as it was started with
    processes: int | None = None

    def __post_init__(self) -> None:
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                f"device = {self.device!r} is not valid; choose one of: auto, cpu, cuda, cuda:<index>")
        require(self.threads is None or self.threads >= 1,
                f"threads = {self.threads} must be at least 1 (or null for torch's default)")
        require(self.processes is None or self.processes >= 1,
                f"processes = {self.processes} must be at least 1 (or null: as many as the run is started with)")
