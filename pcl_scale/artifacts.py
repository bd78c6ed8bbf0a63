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

from torch import nn

METRICS_FILE = "metrics.jsonl"
EMBEDDINGS_FILE = "embeddings.safetensors"
STATE_FILE = "trainer_state.json"
CLUSTERS_FILE = "clusters.safetensors"
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
