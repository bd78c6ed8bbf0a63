"""Creating and closing the Accelerator: the one place that knows this stack's launch traps.

* Without CUDA, ``Accelerator(cpu=True)`` is what turns ``accelerate launch --multi_gpu
  --num_processes N`` (or torchrun) into an N-process gloo group; without it every rank believes
  it is alone.
* Precision has one source of truth (:func:`resolve_precision`): ``run.mixed_precision='auto'``
  (the default) takes the launcher's (``accelerate launch`` exports its config file's
  ``mixed_precision`` as ``ACCELERATE_MIXED_PRECISION``); an explicit value that contradicts the
  launcher's bf16/fp16 is an error naming both. fp16 needs a GPU (loss scaling); bf16 autocast
  works on CPU and GPU.
* DeepSpeed (``accelerate launch`` with a ``distributed_type: DEEPSPEED`` config) is configured
  here: the DeepSpeed JSON is checked against the run's options, precision is mapped onto it
  (bf16 = DeepSpeed's torch autocast with fp32 master weights, which BatchNorm backbones need;
  fp16 = DeepSpeed's fp16 with dynamic loss scaling), and on CPU the three traps of DeepSpeed
  under Accelerate are handled: the process group must be asked for gloo explicitly, Accelerate
  checks a ``transformers`` version it does not need, and DeepSpeed JIT-compiles a shared-memory
  collective at its first init.
* At exit the prepared objects are freed and the process group destroyed, so no gloo worker
  thread (ZeRO-3 leaves asynchronous all-gathers behind) outlives the interpreter.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from pcl_scale.config import Config, ConfigError
from pcl_scale.core.model import PCLModel
from pcl_scale.distributed.comm import Comm


def deepspeed_requested() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config (or ``--use_deepspeed``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """The run's precision and why it is that one (for the log and for errors)."""

    value: str  # 'no' | 'bf16' | 'fp16'
    reason: str


def resolve_precision(cfg: Config) -> Precision:
    """The one precision of the run, from ``run.mixed_precision`` and the launcher's.

    ``accelerate launch`` exports ``--mixed_precision``, else its config file's
    ``mixed_precision``, to every process as ``ACCELERATE_MIXED_PRECISION``; 'no' when neither
    sets it (Accelerate itself refuses a config file's ``mixed_precision`` next to a DeepSpeed
    JSON: there only the flag counts). 'auto' takes the launcher's value ('no' without a
    launcher). An explicit value stands when the launcher says 'no' or nothing (Accelerate
    exports 'no' also when its config is silent), and is an error naming both values when the
    launcher says bf16 or fp16 and the run something else.
    """
    asked = cfg.run.mixed_precision
    if asked not in ("auto", *PRECISIONS):
        raise ConfigError(
            f"run.mixed_precision={asked!r} is not one of auto, {', '.join(PRECISIONS)}"
        )
    env = os.environ.get(LAUNCHER_PRECISION, "").lower()
    launcher = f"the launcher's {LAUNCHER_PRECISION}={env}"
    if env and env not in PRECISIONS:
        raise ConfigError(
            f"the launcher asks for mixed precision {env!r} ({LAUNCHER_PRECISION}={env}, from "
            "accelerate launch's --mixed_precision or its config file): pcl-scale runs no, bf16 or "
            "fp16; set one of them in the accelerate config"
        )
    if asked == "auto":
        if not env:
            return Precision("no", "run.mixed_precision=auto and no launcher precision")
        return Precision(env, f"run.mixed_precision=auto: {launcher}")
    if env not in ("", "no", asked):
        raise ConfigError(
            f"run.mixed_precision={asked!r} contradicts the launcher's mixed precision {env!r} "
            f"({LAUNCHER_PRECISION}={env}, from accelerate launch's --mixed_precision or its "
            f"config file): set run.mixed_precision=auto (or {env}) to follow the launcher, or "
            f"set mixed_precision: {asked!r} in the accelerate config"
        )
    agrees = f", as {launcher}" if env == asked else ""
    return Precision(asked, f"run.mixed_precision={asked}{agrees}")


def make_accelerator(cfg: Config) -> Any:
    """The run's Accelerator (DDP, one process or DeepSpeed), its precision logged with why."""
    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg)
    if precision.value == "fp16" and not on_gpu:
        raise ConfigError(
            f"fp16 needs a CUDA GPU (loss scaling) and none is visible ({precision.reason}): on "
            "CPU use bf16 or no"
        )
    accelerator = _accelerator(cfg, precision.value, on_gpu)
    accelerator.print(f"precision: {precision.value} ({precision.reason})")
    return accelerator


def _accelerator(cfg: Config, precision: str, on_gpu: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    common: dict[str, Any] = dict(
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=list(cfg.run.trackers) or None,
        project_config=ProjectConfiguration(
            project_dir=cfg.run.output_dir, logging_dir=cfg.run.output_dir
        ),
    )
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    timeout = timedelta(minutes=cfg.run.collective_timeout_min)
    if not deepspeed_requested():
        # buffers are synchronised where they are read (sync_buffers): DDP's broadcast of every
        # buffer (BatchNorm statistics, the queue) at each forward would only add traffic
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        return Accelerator(
            cpu=not on_gpu,
            mixed_precision=precision,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout), ddp],
            **common,
        )
    plugin = _deepspeed_plugin(cfg, precision, on_gpu)
    group = InitProcessGroupKwargs(timeout=timeout, **({} if on_gpu else {"backend": "gloo"}))
    return Accelerator(
        deepspeed_plugin=plugin,
        # bf16 is DeepSpeed's torch autocast (set in the plugin), not Accelerate's bf16 mode
        mixed_precision="fp16" if precision == "fp16" else "no",
        kwargs_handlers=[group],
        **common,
    )


def _deepspeed_plugin(cfg: Config, precision: str, on_gpu: bool) -> Any:
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import accelerate.utils.dataclasses as acc_dataclasses
    from accelerate.utils import DeepSpeedPlugin

    if importlib.util.find_spec("transformers") is None:
        # Accelerate compares the transformers version here even when zero3_init_flag is off;
        # the weak reference it sets only serves transformers' from_pretrained under zero.Init.
        acc_dataclasses.DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None
    if not on_gpu:
        # skip the JIT build (~25 s, g++) of DeepSpeed's shared-memory CPU all-reduce
        comm_module: Any = importlib.import_module("deepspeed.comm.torch")
        comm_module.build_shm_op = lambda: None
    try:
        plugin = DeepSpeedPlugin()
    except (OSError, ValueError) as err:  # unreadable JSON, no zero_optimization block, ...
        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
        raise ConfigError(
            f"cannot use DeepSpeed config {source}: {err}. Start from ds_configs/zero2.json"
        ) from err
    if plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag=true in the Accelerate config: pcl-scale builds its two encoders "
            "before DeepSpeed starts; set zero3_init_flag: false"
        )
    check_deepspeed_config(plugin.deepspeed_config, cfg, os.environ.get("WORLD_SIZE", "1"))
    ds = plugin.deepspeed_config
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        ds["bf16"] = {"enabled": False}
    if plugin.zero_stage == 3:  # the export consolidates the partitioned weights on rank 0
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 0.0  # as under DDP (and the reference): no clipping
    return plugin


def check_deepspeed_config(ds: dict[str, Any], cfg: Config, world_size: str | int) -> None:
    """Refuse a DeepSpeed JSON that contradicts the run's options, naming both sides."""
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    for block, option in (
        ("optimizer", "optim.lr/momentum/weight_decay"),
        ("scheduler", "optim.schedule"),
    ):
        if block in ds:
            kind = ds[block].get("type", "?") if isinstance(ds[block], dict) else ds[block]
            raise ConfigError(
                f"{source} defines a {block!r} ({kind}) but pcl-scale builds the SGD optimizer "
                f"and its schedule from {option}: remove the {block!r} block from the JSON"
            )
    world = int(world_size)
    local = cfg.optim.batch_size // max(world * cfg.optim.grad_accum, 1)
    expected = {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": local,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
    }
    for key, want in expected.items():
        have = ds.get(key, "auto")
        if have != "auto" and int(have) != want:
            raise ConfigError(
                f"{source} sets {key}={have} but optim.batch_size={cfg.optim.batch_size}, "
                f"optim.grad_accum={cfg.optim.grad_accum} on {world} processes need {want}: "
                f'set it to "auto"'
            )
    precision = resolve_precision(cfg).value
    if _enabled(ds.get("bf16")):
        raise ConfigError(
            f'{source} enables "bf16" (bf16 parameters), which breaks BatchNorm backbones and the '
            "momentum encoder's fp32 EMA: remove it and set run.mixed_precision=bf16 (DeepSpeed's "
            "torch autocast with fp32 master weights)"
        )
    if _enabled(ds.get("fp16")) and precision != "fp16":
        raise ConfigError(
            f'{source} enables "fp16" but run.mixed_precision={precision!r}: set '
            'run.mixed_precision=fp16 and "fp16": {"enabled": "auto"}'
        )
    if _enabled(ds.get("torch_autocast")) and precision != "bf16":
        raise ConfigError(
            f'{source} enables "torch_autocast" but run.mixed_precision={precision!r}: set '
            "run.mixed_precision=bf16 instead (it turns on DeepSpeed's torch autocast)"
        )


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and str(block.get("enabled", False)).lower() == "true"


def uses_channels_last(cfg: Config, accelerator: Any) -> bool:
    """``run.channels_last``: 'auto' is on for ResNets on CUDA (tensor-core convolutions want
    NHWC), off elsewhere (CPU convolutions and ViTs gain nothing)."""
    if cfg.run.channels_last != "auto":
        return cfg.run.channels_last == "true"
    return accelerator.device.type == "cuda" and cfg.model.backbone.startswith("resnet")


def speed_up(model: PCLModel, cfg: Config, accelerator: Any) -> list[str]:
    """Channels-last weights and compiled encoders, as the run asks; what was done, for the log.

    ``Module.compile`` compiles in place, so parameter names, the EMA and the exports are those
    of the eager model.
    """
    done = []
    if uses_channels_last(cfg, accelerator):
        model.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if cfg.run.compile:
        if deepspeed_requested():
            raise ConfigError(
                "run.compile=true under DeepSpeed: pcl-scale compiles only under DDP or on one "
                'process; use DeepSpeed\'s own "compile" config instead, or run.compile=false'
            )
        model.encoder_q.compile()
        model.encoder_k.compile()
        done.append("torch.compile")
    return done


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage of a DeepSpeed run; 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def set_deepspeed_batch(accelerator: Any, local_batch: int) -> None:
    """Tell DeepSpeed the micro-batch per process before ``prepare`` (no DataLoader is prepared)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = local_batch


def autocast_context(accelerator: Any, cfg: Config) -> Callable[[], Any]:
    """The autocast for forwards, including those that run outside a DeepSpeed engine.

    Without DeepSpeed it is Accelerate's. Under DeepSpeed, the engine's own forward autocasts
    (bf16) or runs in fp16; the momentum encoder, the E-step and the evaluation call the
    model's modules directly, so they get the same torch autocast here.
    """
    if not deepspeed_requested():
        return accelerator.autocast
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg).value)
    if dtype is None:
        return contextlib.nullcontext
    device_type = accelerator.device.type
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def distributed_kind(accelerator: Any) -> str:
    """How the run's state is laid out on disk: 'ddp' or 'zero<stage>'."""
    stage = zero_stage(accelerator)
    return f"zero{stage}" if deepspeed_requested() else "ddp"


def describe_deepspeed(accelerator: Any) -> str:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return ""
    keys = ("zero_optimization", "torch_autocast", "fp16", "bf16", "gradient_clipping")
    shown = {k: plugin.deepspeed_config[k] for k in keys if k in plugin.deepspeed_config}
    return json.dumps(shown, default=str)


def shutdown(accelerator: Any) -> None:
    """Free prepared objects and tear down the process group (clean exit on every rank)."""
    import torch.distributed as dist

    accelerator.free_memory()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap(accelerator: Any, model: Any) -> PCLModel:
    """The :class:`PCLModel` inside whatever DDP/DeepSpeed wrapped around it."""
    inner = accelerator.unwrap_model(model)
    assert isinstance(inner, PCLModel)
    return inner


def sync_buffers(model: PCLModel, comm: Comm) -> None:
    """Rank 0's BatchNorm running statistics on every rank.

    Training forwards use batch statistics; the E-step, evaluation and export read the running
    ones, so they are made identical across ranks first. DDP broadcasts buffers only at the start
    of its forward (each rank's key encoder then updates its own), and DeepSpeed never does.
    """
    comm.broadcast_buffers(model, src=0)


def model_state(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """The full model state on the main process (collective: call on every rank).

    Under ZeRO-3 the partitioned weights are consolidated on the main process (other ranks get
    an empty result); otherwise it is the local state dict, whose tensors alias the weights.
    """
    sync_buffers(unwrap(accelerator, model), Comm())
    if zero_stage(accelerator) == 3:
        return accelerator.get_state_dict(model) or {}
    return unwrap(accelerator, model).state_dict()
