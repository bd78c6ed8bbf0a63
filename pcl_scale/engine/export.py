"""The published export: the online backbone as safetensors with torchvision/timm key names.

``model.safetensors`` loads with strict key matching into the plain library model (recipe in
``config.json`` and the generated ``README.md``) without importing pcl_scale; the projection head
is kept beside it in ``head.safetensors``. The directory is written to a temporary name and
renamed, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from pcl_scale import __version__
from pcl_scale.config import Config, to_dict
from pcl_scale.core.model import VITS, PCLModel


def library_recipe(cfg: Config) -> dict[str, Any]:
    """How to rebuild the backbone with the plain library: goes into ``config.json``."""
    m = cfg.model
    if m.backbone in VITS:
        return {
            "library": "timm",
            "architecture": VITS[m.backbone],
            "create_model_kwargs": {
                "num_classes": 0,
                "img_size": cfg.data.image_size,
                "patch_size": m.patch_size,
            },
        }
    return {
        "library": "torchvision",
        "architecture": m.backbone,
        "small_stem": m.small_stem,
        "fc": "Identity",
    }


def _model_card(cfg: Config, recipe: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    if recipe["library"] == "timm":
        kw = recipe["create_model_kwargs"]
        load = (
            "import timm\nfrom safetensors.torch import load_file\n\n"
            f"model = timm.create_model({recipe['architecture']!r}, num_classes=0, "
            f"img_size={kw['img_size']}, patch_size={kw['patch_size']})\n"
            'model.load_state_dict(load_file("model.safetensors"))\n'
        )
    else:
        stem = (
            "model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)\nmodel.maxpool = nn.Identity()\n"
            if recipe["small_stem"]
            else ""
        )
        load = (
            "import torchvision\nfrom safetensors.torch import load_file\nfrom torch import nn\n\n"
            f"model = torchvision.models.{recipe['architecture']}()\n{stem}"
            'model.fc = nn.Identity()\nmodel.load_state_dict(load_file("model.safetensors"))\n'
        )
    lines = [
        f"# PCL {cfg.model.backbone} backbone",
        "",
        "Self-supervised with Prototypical Contrastive Learning (Li et al., ICLR 2021) by "
        f"pcl-scale {__version__} on `{cfg.data.source}` (split `{cfg.data.split}`), "
        f"{cfg.optim.epochs} epochs, clusters {cfg.pcl.num_clusters}, head `{cfg.model.head}`.",
        "",
        "The weights are the online encoder's backbone; the output is the pooled feature "
        "(the projection head is in `head.safetensors`).",
        "",
        "```python",
        load.rstrip(),
        "```",
        "",
        f"Input: {cfg.data.image_size} px RGB, normalised with mean {cfg.data.mean} and std "
        f"{cfg.data.std}.",
    ]
    if metrics:
        lines += ["", "## Evaluation", "", "```", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _submodule_state(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {
        k[len(prefix) :]: v.detach().float().cpu().contiguous()
        for k, v in state.items()
        if k.startswith(prefix)
    }
    if not out:
        raise ValueError(f"no {prefix}* entries in the model state dict")
    return out


def export_backbone(
    model: PCLModel | Mapping[str, Tensor],
    cfg: Config,
    out_dir: Path,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``head.safetensors``, ``config.json`` and ``README.md``.

    ``model`` is the PCL model or its full state dict (under ZeRO-3, the consolidated one from
    ``accelerator.get_state_dict``); the online encoder's backbone and head are published.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    backbone = _submodule_state(state, "encoder_q.backbone.")
    head = _submodule_state(state, "encoder_q.head.")
    num_features = next(v for k, v in head.items() if k.endswith("weight")).shape[1]
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "pt"}
    save_file(backbone, str(tmp / "model.safetensors"), meta)
    save_file(head, str(tmp / "head.safetensors"), meta)
    recipe = library_recipe(cfg)
    config = {
        **recipe,
        "num_features": int(num_features),
        "embedding_dim": cfg.model.dim,
        "head": cfg.model.head,
        "image_size": cfg.data.image_size,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "pcl_scale_version": __version__,
        "training_config": to_dict(cfg),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "README.md").write_text(_model_card(cfg, recipe, metrics))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def push_to_hub(export_dir: Path, repo_id: str) -> None:
    """Upload an export directory to the Hugging Face Hub (needs a token and network)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(export_dir), repo_id=repo_id)
