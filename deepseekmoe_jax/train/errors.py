"""The errors of a training run: `TrainError` (the run cannot start or continue) and `NonFiniteLoss`."""

from __future__ import annotations


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class NonFiniteLoss(TrainError):
    """The loss or gradient norm became NaN/inf at ``step``; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
