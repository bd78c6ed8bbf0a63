"""Checks of a config, once, before anything runs or is written.

Each raises :class:`pcl_scale.config.ConfigError` naming the bad value and what to do.
:func:`validate` needs only the config and the process count; :func:`validate_for_data` also the
training set's size; :func:`validate_eval` covers what ``pcl-scale eval`` reads.
"""

from __future__ import annotations

import math

import torch

from pcl_scale.config import (
    EVAL_PROTOCOLS,
    OPTIONAL_EVAL_PROTOCOLS,
    Config,
    ConfigError,
    steps_per_epoch,
)
from pcl_scale.core.kmeans import faiss_gpu_count
from pcl_scale.core.model import VITS, BackboneSpec, backbone_library, build_backbone
from pcl_scale.data import BUILTINS

_CHOICES = {
    ("data", "aug"): ("aug", "aug_plus"),
    ("data", "on_bad_image"): ("fail", "skip"),
    ("data", "photometric"): ("workers", "device"),
    ("model", "head"): ("linear", "mlp"),
    ("pcl", "queue_init"): ("keys", "random"),
    ("pcl", "concentration"): ("estimated", "fixed"),
    ("estep", "backend"): ("auto", "torch", "faiss"),
    ("estep", "mode"): ("auto", "gather", "sharded"),
    ("estep", "init"): ("random", "kmeans++"),
    ("optim", "schedule"): ("step", "cosine"),
    ("run", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    ("run", "channels_last"): ("auto", "true", "false"),
}


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check values once; raise :class:`ConfigError` naming the bad value and the fix."""
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_views(cfg)
    _check_data_source(cfg)
    _check_batch_and_clusters(cfg, world_size)
    _check_faiss_gpus(cfg.estep.faiss_gpus, cfg.estep.backend)


def _check_faiss_gpus(devices: list[int], backend: str) -> None:
    """An explicit ``estep.faiss_gpus`` must name distinct GPUs that faiss-gpu can use."""
    if not devices:
        return
    if backend == "torch":
        raise ConfigError(
            f"estep.faiss_gpus={devices} is read by the faiss backend only, but "
            f"estep.backend='torch': set estep.backend=faiss or estep.faiss_gpus=[]"
        )
    available = faiss_gpu_count()
    if available == 0:
        raise ConfigError(
            f"estep.faiss_gpus={devices} needs faiss-gpu, but faiss here has no GPUs (or is not "
            f"installed): pip install 'pcl-scale[gpu]', or set estep.faiss_gpus=[]"
        )
    if len(set(devices)) != len(devices) or not all(0 <= d < available for d in devices):
        raise ConfigError(
            f"estep.faiss_gpus={devices} must list distinct GPU ids in 0..{available - 1}"
        )


def _check_choices(cfg: Config) -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}")
    try:
        library = backbone_library(cfg.model.backbone)
    except ValueError as err:
        raise ConfigError(f"model.{err}") from err
    if library == "timm":  # on the meta device: a size the model cannot take fails now, not later
        spec = BackboneSpec(cfg.model.backbone, False, cfg.data.image_size, cfg.model.patch_size)
        try:
            with torch.device("meta"):
                build_backbone(spec)
        except ValueError as err:
            raise ConfigError(f"model.backbone={cfg.model.backbone!r}: {err}") from err
    if cfg.run.trackers and not set(cfg.run.trackers) <= {"tensorboard", "wandb"}:
        raise ConfigError(f"run.trackers={cfg.run.trackers}: supported are tensorboard, wandb")


def _check_ranges(cfg: Config) -> None:
    positive = {
        "data.image_size": cfg.data.image_size,
        "model.dim": cfg.model.dim,
        "pcl.r": cfg.pcl.r,
        "optim.epochs": cfg.optim.epochs,
        "optim.batch_size": cfg.optim.batch_size,
        "optim.grad_accum": cfg.optim.grad_accum,
        "estep.nredo": cfg.estep.nredo,
        "estep.every": cfg.estep.every,
        "data.prefetch_factor": cfg.data.prefetch_factor,
        "run.stop_check_every": cfg.run.stop_check_every,
        "run.checkpoint_every": cfg.run.checkpoint_every,
        "run.keep_checkpoints": cfg.run.keep_checkpoints,
        "run.log_every": cfg.run.log_every,
        "pcl.temperature": cfg.pcl.temperature,
        "optim.lr": cfg.optim.lr,
        "run.collective_timeout_min": cfg.run.collective_timeout_min,
    }
    for name, value in positive.items():
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name}={value} must be a positive number")
    non_negative = {
        "data.max_samples": cfg.data.max_samples,
        "data.num_workers": cfg.data.num_workers,
        "pcl.warmup_epochs": cfg.pcl.warmup_epochs,
        "estep.niter": cfg.estep.niter,
        "estep.batch_size": cfg.estep.batch_size,
        "optim.weight_decay": cfg.optim.weight_decay,
        "run.export_every": cfg.run.export_every,
        "run.max_steps_per_epoch": cfg.run.max_steps_per_epoch,
        "pcl.queue_size": cfg.pcl.queue_size,
        "run.checkpoint_every_steps": cfg.run.checkpoint_every_steps,
        "run.knn_every": cfg.run.knn_every,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0")
    if not 0.0 <= cfg.pcl.momentum <= 1.0:
        raise ConfigError(f"pcl.momentum={cfg.pcl.momentum} must be in [0, 1]")


def _check_views(cfg: Config) -> None:
    if not 0.0 < cfg.data.crop_min_scale <= 1.0:
        raise ConfigError(f"data.crop_min_scale={cfg.data.crop_min_scale} must be in (0, 1]")
    jitter = cfg.data.color_jitter
    if jitter and (len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5):
        raise ConfigError(
            f"data.color_jitter={jitter} needs 4 values >= 0 (brightness, contrast, saturation, "
            f"hue <= 0.5), e.g. [0.4,0.4,0,0] for gray images, or [] for the aug's own"
        )
    for key in ("rotate_degrees", "shear_degrees"):
        value = getattr(cfg.data, key)
        if not 0.0 <= value < 90.0:
            raise ConfigError(f"data.{key}={value} must be in [0, 90): a range of +-{key}")
    if len(mp := cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        raise ConfigError(f"data.mean={mp} and data.std={cfg.data.std} need 3 values, std > 0")
    if cfg.model.backbone in VITS and cfg.data.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not a multiple of "
            f"model.patch_size={cfg.model.patch_size}: change one of them"
        )


def _check_data_source(cfg: Config) -> None:
    """``data.data_files``, ``data.name`` and ``data.revision`` read folders and Hub datasets."""
    d = cfg.data
    for split, files in d.data_files.items():
        if not split or not files:
            raise ConfigError(
                f"data.data_files={dict(d.data_files)} needs a split name and a file or glob in "
                f"every entry, e.g. data.data_files.train='data/train-*.parquet'"
            )
    hub_options = {"data_files": dict(d.data_files), "name": d.name, "revision": d.revision}
    if d.source in BUILTINS and (used := {k: v for k, v in hub_options.items() if v}):
        listed = " ".join(f"data.{k}={v!r}" for k, v in used.items())
        raise ConfigError(
            f"{listed} reads a folder or a Hub dataset, but data.source={d.source!r} is built in: "
            f"set data.source to the folder the files are relative to (data.source=. for the "
            f"working directory) or to a Hub dataset name"
        )


def _check_batch_and_clusters(cfg: Config, world_size: int) -> None:
    if not cfg.pcl.num_clusters or min(cfg.pcl.num_clusters) < 2:
        raise ConfigError(
            f"pcl.num_clusters={cfg.pcl.num_clusters} needs at least one granularity with K >= 2"
        )
    per_step = world_size * cfg.optim.grad_accum
    if cfg.optim.batch_size % per_step:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} is not divisible by processes x "
            f"grad_accum = {world_size} x {cfg.optim.grad_accum}: choose a multiple of {per_step}"
        )
    local_batch = cfg.optim.batch_size // per_step
    smallest = min(cfg.pcl.num_clusters)
    if smallest < cfg.pcl.r + local_batch:
        raise ConfigError(
            f"pcl.r={cfg.pcl.r} negative prototypes need every K >= r + batch per process "
            f"({cfg.pcl.r} + {local_batch}), but the smallest of pcl.num_clusters is K={smallest}:"
            f" lower pcl.r to at most {smallest - local_batch} or raise the cluster counts"
        )


def validate_for_data(cfg: Config, n: int, world_size: int) -> None:
    """The checks that need the training set's size ``n`` (after :func:`validate`)."""
    if max(cfg.pcl.num_clusters) > n:
        raise ConfigError(
            f"pcl.num_clusters={cfg.pcl.num_clusters} asks for more clusters than the {n} "
            f"training samples: every K must be at most {n}"
        )
    if steps_per_epoch(cfg, n, world_size) == 0:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} x optim.grad_accum={cfg.optim.grad_accum} "
            f"needs more than the {n} training samples for one optimizer step: lower them"
        )


def validate_eval(cfg: Config) -> None:
    """Check the options ``pcl-scale eval`` reads: the data section and the eval section."""
    e = cfg.eval
    unknown = sorted(set(e.protocols) - set(EVAL_PROTOCOLS) - set(OPTIONAL_EVAL_PROTOCOLS))
    if unknown or not e.protocols:
        raise ConfigError(
            f"eval.protocols={e.protocols}: unknown protocols {unknown}; choose from "
            f"{list(EVAL_PROTOCOLS + OPTIONAL_EVAL_PROTOCOLS)}"
        )
    for name, value in {"eval.batch_size": e.batch_size, "eval.lowshot_runs": e.lowshot_runs,
                        "eval.linear_epochs": e.linear_epochs}.items():  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{name}={value} must be a positive number")
    if not e.lowshot_ks or min(e.lowshot_ks) <= 0:
        raise ConfigError(f"eval.lowshot_ks={e.lowshot_ks} must be positive counts, e.g. [1,2,4]")
    for name, value in {"data.max_samples": cfg.data.max_samples,
                        "data.num_workers": cfg.data.num_workers,
                        "eval.probe_max_samples": e.probe_max_samples}.items():  # fmt: skip
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0")
    if not cfg.data.eval_split:
        raise ConfigError("data.eval_split='' : pcl-scale eval needs a query split, e.g. test")
    _check_data_source(cfg)
