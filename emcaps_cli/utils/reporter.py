"""The progress hooks a training run calls; torch-free, so the command line can subclass them
without importing the training code."""

from __future__ import annotations

from typing import Any


class Reporter:
    """Progress hooks (no-ops here). Only rank 0 calls them; the CLI draws them with rich."""

    def start(self, info: dict[str, Any]) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...

    def step(self, done: int, loss: float, images_per_second: float) -> None: ...

    def evaluating(self) -> None: ...

    def epoch_end(self, metrics: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...
