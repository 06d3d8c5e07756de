"""bench/bench_online_step.py runs end to end at a tiny size and prints one row per optimizer."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_prints_every_ratio_and_holds_the_allocator_on_glibc() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_online_step.py"), "--models", "lenet5", "--repeats", "1",
         "--batch", "8", "--device", "cpu"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300, check=True,
    )
    lines = result.stdout.splitlines()
    kept = "yes" if platform.libc_ver()[0] == "glibc" else "no (not glibc)"
    assert f"freed memory kept in the heap: {kept}" in lines[0]
    rows = [line for line in lines if line.startswith("| lenet5")]
    assert [row.split(" | ")[1] for row in rows] == ["sgd", "adam"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 10 and len(cells[3].split(" / ")) == 3
        assert all(float(cells[i]) > 0 for i in (2, 5, 6, 7, 9))
