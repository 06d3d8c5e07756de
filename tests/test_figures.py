"""The figures module draws without pyplot's state: importing the project or drawing leaves the backend a user
chose (MPLBACKEND) as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRAW = """
import sys
from pathlib import Path
import train, compare
from engine import figures
out = Path(sys.argv[1])
shape = {"prediction": [0.0, 0.5, 1.0], "y=1": [2.0, 0.7, 0.0], "y=0": [0.0, 0.7, 2.0]}
figures.loss_shape_figure(shape, "t").savefig(out / "shape.png")
figures.support_shape_figure([-1.0, 0.0, 1.0], [1.5, 0.7, 0.3], [1.3, 0.7, 0.3]).savefig(out / "support.png")
figures.accuracy_bars([{"method": "npbml", "mean": 0.9, "ci95": 0.01}], out / "a.png")
import matplotlib
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""


def test_importing_the_project_and_drawing_keep_the_users_matplotlib_backend(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", DRAW, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    for name in ("shape.png", "support.png", "a.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
