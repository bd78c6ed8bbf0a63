"""Creating and closing the Accelerator: the one place that knows this stack's launch traps.

* Without CUDA, ``Accelerator(cpu=True)`` is what turns ``accelerate launch --multi_gpu
  --num_processes N`` (or torchrun) into an N-process gloo group; without it every rank believes
  it is alone.
* fp16 needs a GPU (loss scaling); bf16 autocast works on CPU and GPU.
* At exit the process group is destroyed after freeing the prepared objects, so no gloo worker
  thread outlives the interpreter.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from pcl_scale.config import Config, ConfigError


def make_accelerator(cfg: Config) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    on_gpu = torch.cuda.is_available()
    if cfg.run.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError(
            "run.mixed_precision='fp16' needs a CUDA GPU (loss scaling); on CPU use 'bf16' or 'no'"
        )
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=list(cfg.run.trackers) or None,
        project_config=ProjectConfiguration(
            project_dir=cfg.run.output_dir, logging_dir=cfg.run.output_dir
        ),
    )


def shutdown(accelerator: Any) -> None:
    """Free prepared objects and tear down the process group (clean exit on every rank)."""
    import torch.distributed as dist

    accelerator.free_memory()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
