"""An exclusive claim on a run folder, so that two processes never write one run.

The claim is `<run>/run.lock`, created with O_EXCL (atomic on a local or NFS v3+ file system) and holding the
owner's PID, host and start time; it is removed when the run ends, however it ends short of a kill -9. A lock
left by a process that no longer runs on this host is stale: it is reported with the command that takes it over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from engine.errors import UserError

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of the run folder `path`: `acquire` claims it or raises a UserError; `release` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path / LOCK_NAME
        self.held = False

    def owner(self) -> dict[str, object]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def is_stale(self) -> bool:
        """The lock exists and its owner was on this host and no longer runs."""
        owner = self.owner()
        return (self.path.exists() and owner.get("host") == socket.gethostname()
                and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]))

    def acquire(self, take_over: bool = False) -> None:
        """Claim the folder; with `take_over`, first remove a stale lock (never a live owner's)."""
        if take_over and self.is_stale():
            self.path.unlink(missing_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise UserError(self._refusal()) from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        self.held = True

    def _refusal(self) -> str:
        owner, run = self.owner(), self.path.parent
        who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (since {owner.get('since', '?')})"
        if self.is_stale():
            return (f"run folder {run} is locked by {who}, which no longer runs (it was killed); take the run over "
                    f"with: python train.py --resume {run} --take-over")
        return (f"run folder {run} is in use by {who}; wait for that run to end, or start this one under another "
                "name with --set name=...")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
