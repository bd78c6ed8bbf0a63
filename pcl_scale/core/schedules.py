"""Learning-rate schedules as pure functions of the (fractional) epoch, applied every iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence


def learning_rate(
    base_lr: float,
    epoch: float,
    total_epochs: int,
    schedule: str,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """lr at a fractional epoch (``epoch + step / steps_per_epoch``).

    ``step``: base_lr * gamma ** (number of milestones <= epoch), as the reference (which updates
    once per epoch, so the value is the same at every iteration of an epoch).
    ``cosine``: base_lr * 0.5 * (1 + cos(pi * epoch / total_epochs)), per iteration.
    """
    if schedule == "step":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs))
    raise ValueError(f"unknown lr schedule {schedule!r}: use 'step' or 'cosine'")
