"""Resume checkpoints: written atomically (temporary directory, then rename), the last N kept.

A checkpoint directory ``checkpoints/epoch_XXXX`` holds Accelerate's state (model with queue,
optimizer, RNG states), ``clusters.safetensors`` (the last E-step's result, when there is one)
and ``trainer_state.json``, written last: a directory without a readable trainer state is
incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pcl_scale.clusters import ClusterResult
from pcl_scale.distributed import Comm
from pcl_scale.errors import UserError

STATE_FILE = "trainer_state.json"
CLUSTERS_FILE = "clusters.safetensors"


@dataclass
class TrainState:
    """Where training stands: the next epoch to run and optimizer steps taken so far."""

    epoch: int = 0
    global_step: int = 0


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    state: TrainState,
    clusters: ClusterResult | None,
    keep: int,
    comm: Comm,
) -> Path:
    """Write a resume checkpoint on every rank's behalf; returns its final path."""
    root = checkpoint_root(run_dir)
    final = root / f"epoch_{state.epoch:04d}"
    tmp = root / f".tmp-{final.name}"
    if comm.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    accelerator.save_state(str(tmp), safe_serialization=True)
    comm.barrier()
    if comm.is_main:
        if clusters is not None:
            save_file(clusters.state_dict(), str(tmp / CLUSTERS_FILE))
        _write_json_durably(tmp / STATE_FILE, asdict(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    comm.barrier()
    return final


def _write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> TrainState | None:
    """The trainer state of a complete checkpoint, or None when it is missing or unreadable."""
    try:
        raw = json.loads((path / STATE_FILE).read_text())
        return TrainState(epoch=int(raw["epoch"]), global_step=int(raw["global_step"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_latest(run_dir: Path) -> Path | None:
    """Newest complete checkpoint under ``run_dir``, skipping incomplete ones."""
    for path in sorted(checkpoint_root(run_dir).glob("epoch_*"), reverse=True):
        if read_state(path) is not None:
            return path
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Map ``run.resume`` to a checkpoint path ('' = none; 'auto' = latest, if any)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    if read_state(path) is None:
        raise UserError(
            f"run.resume={resume!r} is not a complete checkpoint directory (no readable "
            f"{STATE_FILE}): pass a directory under {checkpoint_root(run_dir)} or 'auto'"
        )
    return path


def load_checkpoint(accelerator: Any, path: Path) -> tuple[TrainState, ClusterResult | None]:
    """Restore Accelerate's state in place; return the trainer state and the cluster result."""
    state = read_state(path)
    assert state is not None
    accelerator.load_state(str(path))
    clusters_path = path / CLUSTERS_FILE
    clusters = (
        ClusterResult.from_state_dict(load_file(str(clusters_path)))
        if clusters_path.is_file()
        else None
    )
    return state, clusters
