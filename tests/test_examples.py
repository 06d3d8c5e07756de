"""The examples run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_hand_written_loop_example_trains_and_saves_the_learned_loss(tmp_path, shared_data) -> None:
    saved = tmp_path / "loss.pt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_adaptive_loss.py"), "--data-root", str(shared_data),
         "--steps", "4", "--batch-size", "16", "--log-every", "2", "--eval-batches", "1", "--save", str(saved)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "step 4: cross-entropy" in result.stdout and "test error on 256 images" in result.stdout
    assert saved.stat().st_size > 0
