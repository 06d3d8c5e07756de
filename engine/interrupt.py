"""Ctrl-C and SIGTERM stop a run at the next step boundary, after a checkpoint, not mid-update."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class RunInterrupted(KeyboardInterrupt):
    """A run stopped at a step boundary after its checkpoint; `resume` is the exact command that continues it."""

    def __init__(self, resume: str) -> None:
        super().__init__(resume)
        self.resume = resume


class StopRequest:
    """Context manager: the first SIGINT/SIGTERM sets `requested`; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
