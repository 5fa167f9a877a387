"""Ctrl-C and SIGTERM during training: stop after the current step, save, and say how to go on."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the state after the last completed step is in `checkpoint`."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        self.checkpoint = checkpoint
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped; state after the last completed step saved to {checkpoint} "
            f"(continue with --resume --out {checkpoint.parent})"
        )


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts.

    The handlers are installed for the duration of the `with` block (main thread only) and the
    previous ones restored after it; `signum` is the signal received, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
