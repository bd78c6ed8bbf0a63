"""The files a run leaves on disk, and how to read them back without the engine.

The engine writes them (``engine/checkpoint.py``, ``engine/export.py``); evaluation and the
report read them through this module.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pcl_scale.core.clusters import ClusterResult
from pcl_scale.errors import UserError

METRICS_FILE = "metrics.jsonl"
EMBEDDINGS_FILE = "embeddings.safetensors"
STATE_FILE = "trainer_state.json"
CLUSTERS_FILE = "clusters.safetensors"  # the one-file layout of older checkpoints (still read)
CLUSTERS_PARTS = "clusters-*-of-*.safetensors"
PREFIX = "step_"


@dataclass
class TrainState:
    """Where training stands.

    Attributes:
        epoch: the epoch in progress (or the next one to run when ``step_in_epoch`` is 0).
        global_step: optimizer steps taken so far.
        step_in_epoch: optimizer steps already taken in ``epoch`` (a mid-epoch checkpoint).
    """

    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def verify(path: Path) -> tuple[TrainState | None, str]:
    """The trainer state of a complete, undamaged checkpoint, or None and the reason."""
    try:
        raw = json.loads((path / STATE_FILE).read_text())
        state = TrainState(
            epoch=int(raw["epoch"]),
            global_step=int(raw["global_step"]),
            step_in_epoch=int(raw.get("step_in_epoch", 0)),
        )
        files = dict(raw["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"no readable {STATE_FILE} ({type(err).__name__})"
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            actual = f.stat().st_size if f.is_file() else "missing"
            return None, f"{name} has size {actual}, expected {size}"
    return state, ""


def write_cluster_part(directory: Path, clusters: ClusterResult, rank: int, world: int) -> Path:
    """Rank ``rank``'s part of a checkpoint's cluster result: its 1/W of every assignment vector.

    Every rank writes rows ``[rank N / W, (rank + 1) N / W)`` (int32), so no rank writes N-sized
    data while the others wait; part 0 also holds the prototypes and phi (K-sized).
    """
    n = len(clusters.clusterings[0].assignments)
    start, stop = rank * n // world, (rank + 1) * n // world
    tensors = {}
    for m, c in enumerate(clusters.clusterings):
        tensors[f"{m}.assignments"] = c.assignments[start:stop].int().contiguous()
        if rank == 0:
            tensors[f"{m}.prototypes"] = c.prototypes.cpu().contiguous()
            tensors[f"{m}.phi"] = c.phi.cpu().contiguous()
    path = directory / f"clusters-{rank:05d}-of-{world:05d}.safetensors"
    metadata = {"start": str(start), "stop": str(stop), "num_images": str(n)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_clusters(checkpoint: Path) -> ClusterResult | None:
    """A checkpoint's cluster result (None before the first E-step), from any number of parts."""
    if (checkpoint / CLUSTERS_FILE).is_file():
        return ClusterResult.from_state_dict(load_file(str(checkpoint / CLUSTERS_FILE)))
    parts = sorted(checkpoint.glob(CLUSTERS_PARTS))
    if not parts:
        return None
    ranges = []
    for part in parts:
        with safe_open(str(part), framework="pt") as fh:
            meta = fh.metadata()
        ranges.append((int(meta["start"]), int(meta["stop"]), int(meta["num_images"])))
    n = ranges[0][2]
    expected = [(r * n // len(parts), (r + 1) * n // len(parts), n) for r in range(len(parts))]
    if ranges != expected:
        raise UserError(
            f"{checkpoint}: the cluster parts cover rows {[(a, b) for a, b, _ in ranges]}, not "
            f"0..{n} in {len(parts)} parts: resume from another checkpoint (run.resume=PATH)"
        )
    states = [load_file(str(part)) for part in parts]
    merged = dict(states[0])
    for key in [k for k in merged if k.endswith(".assignments")]:
        merged[key] = torch.cat([state[key] for state in states])
    return ClusterResult.from_state_dict(merged)


def find_latest(run_dir: Path) -> Path | None:
    """Newest undamaged checkpoint under ``run_dir``; damaged ones are skipped with a warning."""
    for path in sorted(checkpoint_root(run_dir).glob(f"{PREFIX}*"), reverse=True):
        state, reason = verify(path)
        if state is not None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {reason}", stacklevel=2)
    return None


def load_exported_backbone(export_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a published backbone with plain torchvision/timm from its ``config.json``.

    Returns:
        The model in eval mode (pooled features out) and the export's config.
    """
    from safetensors.torch import load_file

    config = json.loads((export_dir / "config.json").read_text())
    if config["library"] == "timm":
        import timm

        model = timm.create_model(config["architecture"], **config["create_model_kwargs"])
    else:
        import torchvision

        model = getattr(torchvision.models, config["architecture"])()
        if config.get("small_stem"):
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
    model.load_state_dict(load_file(str(export_dir / "model.safetensors")), strict=True)
    return model.eval(), config
