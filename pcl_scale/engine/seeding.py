"""Seeds for every random choice of a run, derived from (run seed, stream, epoch, step, rank).

Each purpose draws from its own stream, so adding draws to one never shifts another, and a resumed
run recomputes exactly the seeds it would have used.
"""

from __future__ import annotations

import random
from enum import IntEnum

import numpy as np
import torch

from pcl_scale.core.seeds import mix_seed


class SeedStream(IntEnum):
    """What a derived seed is for (the values are part of every run's reproducibility)."""

    SETUP = 0  # global RNGs per rank; the initial weights and queue (rank 0's seed everywhere)
    AUGMENT = 1  # a training sample's augmentations in an epoch (seeded per epoch and index)
    LOADER = 2  # the training DataLoader's generator (worker seeds)
    STEP = 3  # a micro-batch's key shuffle and negative-prototype draw
    QUEUE_FILL = 4  # the images, workers and shuffles of the initial queue fill


def derive_seed(seed: int, stream: SeedStream, *parts: int) -> int:
    """A 63-bit seed from (seed, stream, epoch, step, rank, ...): stable across runs and hosts."""
    return mix_seed(seed, int(stream), *parts)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs (the augmentations draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, object]:
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states, to go back to later."""
    state: dict[str, object] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, object]) -> None:
    """Undo every global draw made since :func:`rng_state` (e.g. an interrupted E-step's)."""
    random.setstate(state["python"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]
