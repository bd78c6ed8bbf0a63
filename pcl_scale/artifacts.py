"""The files a run leaves on disk, and how to read them back without the engine.

The engine writes them (``engine/checkpoint.py``, ``engine/export.py``); evaluation and the
report read them through this module.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pcl_scale.core.clusters import ClusterResult
from pcl_scale.core.model import timm_pretrained_cfg
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


PCL_CONFIG = "pcl_config.json"  # an export's PCL fields, beside timm's config.json
ONLINE_BACKBONE, ONLINE_HEAD = "encoder_q.backbone.", "encoder_q.head."


def load_exported_backbone(model: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A backbone to evaluate, in eval mode with pooled features out, and its eval view.

    ``model`` is an export folder (rebuilt by timm from its ``config.json``, or by torchvision
    for the small-stem ResNets), an older export (``config.json`` with a ``library`` field), any
    timm model folder, or a timm model name whose pretrained weights are in the local Hub cache.
    The view is ``{"image_size", "mean", "std", "training_config": {"data": {"resize_size"}}}``.
    """
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "library" in config:  # the format of pcl-scale 0.1's first exports
            return _legacy_export(path, config), config
        own_file = path / PCL_CONFIG
        own = _read_json(own_file) if own_file.is_file() else None
        if own is not None and not own["loader"]["timm"]:
            return _torchvision_export(path, own["loader"]["torchvision"]), own
        import timm

        net = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
        return net.eval(), own or timm_view(net)
    net = timm_pretrained(str(model).removeprefix("timm:"))
    return net.eval(), timm_view(net)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read {path} ({err}): the export is damaged; export it again"
        ) from err


def timm_view(net: nn.Module) -> dict[str, Any]:
    """The eval view of a timm model's ``pretrained_cfg``: its input size, crop and statistics."""
    cfg = getattr(net, "pretrained_cfg", {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    resize = math.floor(size / float(cfg.get("crop_pct", 0.875)))  # timm's own rule
    return {
        "image_size": size,
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "training_config": {"data": {"resize_size": resize}},
    }


def timm_pretrained(name: str) -> nn.Module:
    """timm's ``name`` (``arch`` or ``arch.tag``) with pooled features out, its pretrained weights
    read from the local Hugging Face cache only; a UserError saying how to fetch them."""
    import timm
    from huggingface_hub import hf_hub_download

    pretrained = timm_pretrained_cfg(name) if timm.is_model(name) else None
    if pretrained is None or not pretrained.hf_hub_id:
        raise UserError(
            f"{name!r} is neither a folder with a config.json nor a timm model name with "
            "pretrained weights on the Hub (timm.list_pretrained() lists them)"
        )
    fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    try:
        weights = hf_hub_download(pretrained.hf_hub_id, "model.safetensors",
                                  local_files_only=True)  # fmt: skip
    except Exception as err:  # not cached (offline runs never download)
        raise UserError(
            f"timm's pretrained {name!r} is not in the local Hub cache ({type(err).__name__}): "
            f"fetch it once on a machine with internet and the same HF_HOME: {fetch}"
        ) from err
    overlay = {"file": weights, "hf_hub_id": None, "url": None}
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)


def _torchvision_export(path: Path, recipe: dict[str, Any]) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, recipe["architecture"])()
    if recipe.get("small_stem"):
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return net.eval()


def _legacy_export(path: Path, config: dict[str, Any]) -> nn.Module:
    if config["library"] == "torchvision":
        return _torchvision_export(path, config)
    import timm

    net = timm.create_model(config["architecture"], **config["create_model_kwargs"])
    net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return net.eval()


@dataclass
class InitialWeights:
    """What ``model.init_from`` names: backbone weights, the head's when the source has them."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    source: str


def read_initial_weights(source: str) -> InitialWeights:
    """The weights of ``model.init_from``: ``timm:NAME.TAG`` (local Hub cache), an export
    folder, a checkpoint folder (DDP's ``model.safetensors`` or DeepSpeed's ZeRO shards,
    consolidated on the CPU), or a safetensors file of backbone (or whole PCL model) weights."""
    if source.startswith("timm:"):
        return InitialWeights(timm_pretrained(source[5:]).state_dict(), None, source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return _split_model_state(load_file(str(path)), source)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        head = path / "head.safetensors"
        return InitialWeights(load_file(str(path / "model.safetensors")),
                              load_file(str(head)) if head.is_file() else None, source)  # fmt: skip
    if (path / "model.safetensors").is_file():
        return _split_model_state(load_file(str(path / "model.safetensors")), source)
    if (path / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
        return _split_model_state(state, source)
    raise UserError(
        f"model.init_from={source!r} is not timm:NAME, an export or checkpoint folder, or a "
        ".safetensors file: pass one of those"
    )


def _split_model_state(state: dict[str, torch.Tensor], source: str) -> InitialWeights:
    """A PCL model's state (its online encoder's backbone and head) or a bare backbone's."""
    if not any(k.startswith(ONLINE_BACKBONE) for k in state):
        return InitialWeights(state, None, source)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}

    return InitialWeights(part(ONLINE_BACKBONE), part(ONLINE_HEAD) or None, source)
