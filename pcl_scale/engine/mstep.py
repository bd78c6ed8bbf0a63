"""The M-step: one epoch of InfoNCE + ProtoNCE iterations against the E-step's prototypes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pcl_scale.config import Config
from pcl_scale.core.clusters import ClusterResult
from pcl_scale.core.loss import LossOutput, PCLLoss
from pcl_scale.core.model import PCLModel
from pcl_scale.core.schedules import learning_rate
from pcl_scale.core.seeds import mix_seed
from pcl_scale.data import DeviceInput
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.checkpoint import Layout, TrainState, save_checkpoint
from pcl_scale.engine.keys import shuffled_keys
from pcl_scale.engine.runtime import autocast_context, unwrap
from pcl_scale.engine.seeding import SeedStream, derive_seed
from pcl_scale.engine.signals import StopRequest
from pcl_scale.engine.tracking import JsonlLogger, Meter


@dataclass
class EpochContext:
    """What one epoch of M-steps works with (the loop's state, in one argument)."""

    cfg: Config
    accelerator: Any
    model: Any
    optimizer: Any
    clusters: ClusterResult | None
    comm: Comm
    logger: JsonlLogger
    state: TrainState
    epoch: int
    steps: int  # optimizer steps in this epoch
    layout: Layout
    input: DeviceInput  # loaded uint8 views -> normalised batches on the device
    autocast: Callable[[], Any] = field(init=False)
    loss: PCLLoss = field(init=False)
    inner: PCLModel = field(init=False)  # the model inside its DDP/DeepSpeed wrapper

    def __post_init__(self) -> None:
        self.autocast = autocast_context(self.accelerator, self.cfg)
        self.loss = PCLLoss(self.cfg.pcl.temperature, self.cfg.pcl.r)
        self.inner = unwrap(self.accelerator, self.model)

    def checkpoint(self, run_dir: Path) -> None:
        save_checkpoint(
            self.accelerator,
            run_dir,
            self.state,
            self.clusters,
            self.cfg.run.keep_checkpoints,
            self.comm,
            self.layout,
        )


def learning_rate_at(cfg: Config, epoch: int, step_in_epoch: int, steps: int) -> float:
    """The lr of optimizer step ``step_in_epoch`` of ``epoch`` (the schedule is per iteration)."""
    o = cfg.optim
    return learning_rate(
        o.lr, epoch + step_in_epoch / max(steps, 1), o.epochs, o.schedule, o.milestones, o.gamma
    )


def train_one_epoch(
    ctx: EpochContext, loader: DataLoader, stop: StopRequest, run_dir: Path
) -> bool:
    """M-step iterations of one epoch, from ``state.step_in_epoch`` on.

    Returns False when a stop signal ended the epoch early (after saving a checkpoint).
    """
    cfg, state = ctx.cfg, ctx.state
    ctx.model.train()
    accum = cfg.optim.grad_accum
    meter = Meter(ctx.accelerator.device)
    bar = tqdm(
        total=ctx.steps,
        initial=state.step_in_epoch,
        desc=f"epoch {ctx.epoch}",
        disable=not ctx.comm.is_main,
        leave=False,
    )
    lr = cfg.optim.lr
    for micro, ((im_q, im_k), index) in enumerate(loader):
        if state.step_in_epoch >= ctx.steps:
            break
        if micro % accum == 0:
            lr = start_optimizer_step(ctx)
        meter.add(train_step(ctx, im_q, im_k, index, micro % accum), state.global_step + 1)
        if (micro + 1) % accum:
            continue
        state.global_step += 1
        state.step_in_epoch += 1
        bar.update(1)
        finished = state.step_in_epoch == ctx.steps
        if state.global_step % cfg.run.log_every == 0 or finished:
            log_interval(ctx, meter, lr, run_dir, bar)
            meter = Meter(ctx.accelerator.device)
        if finished:
            break
        if not checkpoint_or_stop(ctx, meter, stop, run_dir):
            bar.close()
            return False
    bar.close()
    return True


def start_optimizer_step(ctx: EpochContext) -> float:
    """Before an optimizer step's first micro-batch: EMA update, then this step's lr."""
    ctx.inner.momentum_update(ctx.cfg.pcl.momentum)
    lr = learning_rate_at(ctx.cfg, ctx.epoch, ctx.state.step_in_epoch, ctx.steps)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    return lr


def log_interval(ctx: EpochContext, meter: Meter, lr: float, run_dir: Path, bar: Any) -> None:
    """Log the interval's mean terms over ranks (stops the run if the loss diverged)."""
    record = meter.summary(ctx.accelerator, ctx.comm, run_dir)
    record.update(epoch=ctx.epoch, step=ctx.state.global_step, lr=lr)
    # mean cosine between queued keys (self-pairs included): near 1 means collapse
    record["queue_mean_cos"] = float(ctx.inner.queue.float().mean(dim=0).pow(2).sum())
    ctx.logger.log(record, step=ctx.state.global_step)
    bar.set_postfix(loss=f"{record['loss']:.3f}")


def checkpoint_or_stop(ctx: EpochContext, meter: Meter, stop: StopRequest, run_dir: Path) -> bool:
    """Checkpoint on the step cadence or a stop request; False when the run must stop.

    The ranks agree on a stop every ``run.stop_check_every`` steps only: the agreement is a
    blocking all-reduce that waits for the device, which would stall the step pipeline.
    """
    every = ctx.cfg.run.checkpoint_every_steps
    due = ctx.state.global_step % ctx.cfg.run.stop_check_every == 0
    stopping = due and stop.agreed(ctx.comm)
    if stopping or (every and ctx.state.global_step % every == 0):
        meter.raise_if_diverged(ctx.comm, run_dir)  # never checkpoint a diverged model
        ctx.checkpoint(run_dir)
    return not stopping


def train_step(
    ctx: EpochContext, im_q: Tensor, im_k: Tensor, index: Tensor, micro: int
) -> LossOutput:
    """One micro-batch: keys (shuffled BN across ranks), loss, backward, step, enqueue.

    ``micro`` is the micro-batch's place in its accumulation window: each micro-batch of an
    optimizer step gets its own key shuffle and negative-prototype draw.
    """
    cfg, accelerator, comm, inner = ctx.cfg, ctx.accelerator, ctx.comm, ctx.inner
    device = accelerator.device
    # the key images cross ranks as uint8 (a quarter of the bytes) and are normalised where they
    # are encoded; the index stays on the host (positives)
    im_k = im_k.to(device, non_blocking=True)

    step_seed = derive_seed(cfg.run.seed, SeedStream.STEP, ctx.epoch, ctx.state.global_step, micro)
    # device-side photometric augmentations (data.photometric=device): one stream per view
    augment_q, augment_k = (
        torch.Generator(device=device).manual_seed(mix_seed(step_seed, comm.rank, view))
        for view in (1, 2)
    )

    def encode_keys(images: Tensor) -> Tensor:
        return inner.embed(ctx.input(images, augment_k))

    with accelerator.accumulate(ctx.model), ctx.autocast():
        q, _ = ctx.model(ctx.input(im_q, augment_q))
        keys = shuffled_keys(encode_keys, im_k, comm, torch.Generator().manual_seed(step_seed))
        k = keys.local
        gen = torch.Generator(device=device).manual_seed(mix_seed(step_seed, comm.rank))
        out = ctx.loss(q, k, inner.queue, index, ctx.clusters, generator=gen)
        accelerator.backward(out.loss)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    inner.enqueue(keys.gathered.float())  # (W B, D): gathered once, with the unshuffle
    return out
