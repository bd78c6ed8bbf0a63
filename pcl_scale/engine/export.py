"""The published export: a timm model folder of the online backbone, with its model card.

``model.safetensors`` holds the backbone with timm/torchvision key names and ``config.json`` is in
timm's format, so ``timm.create_model("local-dir:EXPORT", pretrained=True)`` (or ``hf-hub:ORG/NAME``
after :func:`push_export`) rebuilds it without pcl_scale. torchvision ResNets with the small-image
stem are the exception: timm's ResNet cannot express a 3x3 stride-1 stem without max-pool, so
they load with torchvision, and the card says so. The PCL fields (head, embedding size, the
training config, the evaluation) are in ``pcl_config.json``, the projection head in
``head.safetensors``. The folder is written under a temporary name and renamed, so a reader never
sees half an export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from pcl_scale import __version__
from pcl_scale.artifacts import ONLINE_BACKBONE, ONLINE_HEAD, PCL_CONFIG
from pcl_scale.config import Config, to_dict
from pcl_scale.core.model import (
    BackboneSpec,
    backbone_library,
    timm_arguments,
    timm_pretrained_cfg,
)
from pcl_scale.engine.model_card import model_card
from pcl_scale.errors import UserError


def backbone_spec(cfg: Config) -> BackboneSpec:
    m = cfg.model
    return BackboneSpec(m.backbone, m.small_stem, cfg.data.image_size, m.patch_size)


def timm_loadable(cfg: Config) -> bool:
    """Whether timm rebuilds the backbone: all but the small-stem torchvision ResNets."""
    return not (cfg.model.small_stem and backbone_library(cfg.model.backbone) == "torchvision")


def crop_pct(size: int, resize: int) -> float:
    """``size / resize`` rounded down to 4 decimals: timm resizes to ``floor(size / crop_pct)``,
    which must give ``resize`` back (rounding to nearest can give ``resize - 1``)."""
    pct = math.floor(size / resize * 1e4) / 1e4
    assert math.floor(size / pct) == resize, (size, resize, pct)
    return pct


def timm_config(cfg: Config, num_features: int) -> dict[str, Any]:
    """``config.json`` in timm's format: the architecture, pooled features (``num_classes`` 0),
    the arguments that rebuild it (``model_args``) and the eval view (``pretrained_cfg``)."""
    architecture, kwargs = timm_arguments(backbone_spec(cfg))
    kwargs.pop("num_classes")
    default = timm_pretrained_cfg(architecture)
    size = cfg.data.image_size
    pretrained_cfg = {
        "input_size": [3, size, size],
        "interpolation": "bilinear",  # torchvision's Resize, as the trainer's eval view
        "crop_pct": crop_pct(size, cfg.data.eval_resize),
        "crop_mode": "center",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "num_classes": 0,
        "fixed_input_size": bool(default is not None and default.fixed_input_size),
        "first_conv": default.first_conv if default is not None else "conv1",
        "classifier": default.classifier if default is not None else "fc",
    }
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": num_features,
    }
    if kwargs:
        config["model_args"] = kwargs
    config["pretrained_cfg"] = pretrained_cfg
    return config


def pcl_config(cfg: Config, num_features: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``pcl_config.json``: what is PCL's own (how to load without timm, the head, the run)."""
    loader: dict[str, Any] = {"timm": timm_loadable(cfg)}
    if backbone_library(cfg.model.backbone) == "torchvision":
        loader["torchvision"] = {
            "architecture": cfg.model.backbone,
            "small_stem": cfg.model.small_stem,
            "fc": "Identity",
        }
    return {
        "pcl_scale_version": __version__,
        "backbone": cfg.model.backbone,
        "num_features": num_features,
        "head": cfg.model.head,
        "embedding_dim": cfg.model.dim,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "loader": loader,
        "evaluation": metrics or {},
        "training_config": to_dict(cfg),
    }


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
    model: nn.Module | Mapping[str, Tensor],
    cfg: Config,
    out_dir: Path,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``head.safetensors``, ``config.json``, ``pcl_config.json``
    and the model card ``README.md``.

    ``model`` is the PCL model or its full state dict (under ZeRO-3, the consolidated one from
    ``accelerator.get_state_dict``); the online encoder's backbone and head are published.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    backbone = _submodule_state(state, ONLINE_BACKBONE)
    head = _submodule_state(state, ONLINE_HEAD)
    num_features = int(next(v for k, v in head.items() if k.endswith("weight")).shape[1])
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "pt"}
    save_file(backbone, str(tmp / "model.safetensors"), meta)
    save_file(head, str(tmp / "head.safetensors"), meta)
    config = timm_config(cfg, num_features)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    own = pcl_config(cfg, num_features, metrics)
    (tmp / PCL_CONFIG).write_text(json.dumps(own, indent=2))
    model_card(config, own, out_dir.parent.name or out_dir.name).save(str(tmp / "README.md"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def push_export(export_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub; the repository's URL.

    Checks first what a user can fix (not an export, offline mode, no token) and turns the Hub's
    refusals and network failures into a UserError saying what to do; the folder is only read.
    """
    from huggingface_hub import HfApi

    if (
        not (export_dir / "config.json").is_file()
        or not (export_dir / "model.safetensors").is_file()
    ):
        raise UserError(
            f"{export_dir} is not an export (no config.json and model.safetensors): pass a run's "
            "export folder, e.g. RUN_DIR/export"
        )
    retry = f"then run again: pcl-scale push {export_dir} {repo_id}"
    check_hub_access(retry)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(export_dir),
                          commit_message=f"pcl-scale {__version__} export")  # fmt: skip
    except Exception as err:  # HTTP refusals, DNS/connection failures: all the user's to fix
        raise UserError(
            f"cannot upload {export_dir} to {repo_id!r} ({type(err).__name__}: {err}); check the "
            f"network, the token's write access and the repo id, {retry}"
        ) from err
    return str(url)


def check_hub_access(then: str) -> None:
    """A UserError ending with ``then`` when an upload cannot work: offline mode, or no token
    (checked before a run trains, so that its upload does not fail hours later)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"the Hub is in offline mode (HF_HUB_OFFLINE=1): unset it, {then}")
    if get_token() is None:
        raise UserError(f"no Hugging Face token: run `hf auth login` or set HF_TOKEN, {then}")
