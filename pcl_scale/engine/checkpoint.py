"""Resume checkpoints: written atomically (temporary directory, then rename), the last N kept.

A checkpoint directory ``checkpoints/step_XXXXXXXXX`` (named by optimizer step, so names sort
in training order) holds Accelerate's state (model with queue, optimizer, RNG states),
``clusters-RRRRR-of-WWWWW.safetensors`` (the current E-step result, when there is one: each rank
writes its 1/W of the assignments, rank 0 also the prototypes and phi; any number of processes
reads it back) and
``trainer_state.json``, written last: it records where training stands and the size of every
other file. A directory is only resumed from when that record reads back and every file has its
recorded size; ``run.resume=auto`` skips any other with a warning and takes the next older one.
Checkpoints are written at epoch ends, every ``run.checkpoint_every_steps`` steps, and when a
SIGTERM/SIGINT asks the run to stop.

Under DeepSpeed, Accelerate's state holds DeepSpeed's own checkpoint (a sub-directory with one
optimizer shard per rank; ZeRO-3 also shards the weights). Such a checkpoint resumes on the same
ZeRO stage and number of processes; the layout it was written with is recorded, and a resume
with another layout is refused with a message that says how to convert it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pcl_scale.artifacts import (
    PREFIX,
    STATE_FILE,
    TrainState,
    checkpoint_root,
    find_latest,
    read_clusters,
    verify,
    write_cluster_part,
)
from pcl_scale.core.clusters import ClusterResult
from pcl_scale.distributed.comm import Comm
from pcl_scale.errors import UserError


@dataclass(frozen=True)
class Layout:
    """How the model and optimizer state are split over processes: 'ddp' or 'zero1/2/3'."""

    kind: str = "ddp"
    world_size: int = 1

    def compatible(self, other: Layout) -> bool:
        # DDP state is whole on rank 0: any number of processes can read it
        return self.kind == other.kind and (
            self.kind == "ddp" or self.world_size == other.world_size
        )


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    state: TrainState,
    clusters: ClusterResult | None,
    keep: int,
    comm: Comm,
    layout: Layout = Layout(),
) -> Path:
    """Write a resume checkpoint on every rank's behalf; returns its final path."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{state.global_step:09d}"
    tmp = root / f".tmp-{final.name}"
    if comm.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if clusters is not None:  # every rank its 1/W of the assignments
        write_cluster_part(tmp, clusters, comm.rank, comm.world_size)
    comm.barrier()
    if comm.is_main:
        sizes = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = {**asdict(state), "layout": asdict(layout), "files": sizes}
        _write_json_durably(tmp / STATE_FILE, record)
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
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Map ``run.resume`` to a checkpoint path ('' = none; 'auto' = latest valid, if any)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    state, reason = verify(path)
    if state is None:
        raise UserError(
            f"run.resume={resume!r} is not a complete, undamaged checkpoint ({reason}): pass a "
            f"directory under {checkpoint_root(run_dir)} or 'auto'"
        )
    return path


def agreed_resume(resume: str, run_dir: Path, comm: Comm) -> Path | None:
    """Rank 0's :func:`resolve_resume`, on every rank.

    On a shared filesystem with caching, ranks may list different checkpoints; one choice keeps
    them on the same state. A bad ``run.resume`` is the same error everywhere.
    """
    choice: tuple[str | None, str] = (None, "")
    if comm.is_main:
        try:
            path = resolve_resume(resume, run_dir)
            choice = (str(path) if path is not None else None, "")
        except UserError as err:
            choice = (None, str(err))
    agreed = comm.broadcast_object(choice)
    assert isinstance(agreed, tuple)
    path_text, error = agreed
    if error:
        raise UserError(error)
    return Path(path_text) if path_text is not None else None


def saved_layout(path: Path) -> Layout:
    raw = json.loads((path / STATE_FILE).read_text()).get("layout", {})
    return Layout(str(raw.get("kind", "ddp")), int(raw.get("world_size", 1)))


def load_checkpoint(
    accelerator: Any, path: Path, layout: Layout = Layout()
) -> tuple[TrainState, ClusterResult | None]:
    """Restore Accelerate's state in place; return the trainer state and the cluster result."""
    state, _ = verify(path)
    assert state is not None
    saved = saved_layout(path)
    if not saved.compatible(layout):
        raise UserError(
            f"checkpoint {path} was written by a {saved.kind} run on {saved.world_size} "
            f"processes; this run is {layout.kind} on {layout.world_size}. Resume it with the "
            f"same launcher config and process count, or start a new run from its weights: "
            f"run.resume='' model.init_from={path} run.output_dir=NEW_DIR"
        )
    accelerator.load_state(str(path))
    return state, read_clusters(path)
