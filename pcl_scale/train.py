"""The PCL training loop on Accelerate.

Read top to bottom: :func:`train` sets up (accelerator, data, model, optimizer, resume), then runs
epochs; each epoch after the warm-up starts with the E-step (:mod:`pcl_scale.estep`), then
:func:`train_one_epoch` runs the M-step iterations (InfoNCE + ProtoNCE). Checkpoints, the
published export and the final evaluation follow.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from pcl_scale.checkpoint import (
    Layout,
    TrainState,
    find_latest,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from pcl_scale.clusters import ClusterResult
from pcl_scale.config import Config, ConfigError, save_config, validate
from pcl_scale.data import (
    IndexedImages,
    eval_transform,
    labels_of,
    load_split,
    seed_worker,
    train_transform,
    undecodable_indices,
)
from pcl_scale.distributed import Comm
from pcl_scale.errors import DataError, DivergedError
from pcl_scale.estep import ExtractOptions, choose_mode, extract_all, run_estep
from pcl_scale.export import export_backbone, push_to_hub
from pcl_scale.kmeans import faiss_available
from pcl_scale.loss import LossOutput, pcl_loss
from pcl_scale.metrics import knn_scores, representation_scores
from pcl_scale.model import BackboneSpec, PCLModel
from pcl_scale.report import EMBEDDINGS_FILE, METRICS_FILE
from pcl_scale.runtime import (
    autocast_context,
    describe_deepspeed,
    distributed_kind,
    make_accelerator,
    set_deepspeed_batch,
    shutdown,
    zero_stage,
)
from pcl_scale.schedules import learning_rate

# The raw-pixel baseline is computed only when all eval images fit in this many float values.
RAW_BASELINE_MAX_VALUES = 400_000_000


@dataclass
class RunResult:
    """What a finished run returns (and ``pcl-scale train`` prints)."""

    run_dir: Path
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    clusters: ClusterResult | None = None
    evaluation: dict[str, dict[str, float]] | None = None
    export_dir: Path | None = None
    interrupted: bool = False


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, purpose, epoch, step, rank): stable across runs."""
    return int(
        np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class JsonlLogger:
    """Metrics to ``metrics.jsonl`` in the run directory (main process) and to trackers.

    Each line also carries ``elapsed_s``, seconds since this process started logging (a resumed
    run starts again from 0).
    """

    def __init__(self, path: Path, accelerator: Any, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = path, accelerator, enabled
        self.records: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def log(self, record: dict[str, Any], step: int) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        elapsed = round(time.perf_counter() - self.start, 4)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({**record, "elapsed_s": elapsed}) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, int | float)}
        self.accelerator.log(numeric, step=step)


# ---------------------------------------------------------------------------------------------


def train(cfg: Config) -> RunResult:
    """Train PCL as configured; returns where the run wrote its outputs and what it measured."""
    accelerator = make_accelerator(cfg)
    try:
        with StopRequest() as stop:
            return _train(cfg, accelerator, stop)
    finally:
        shutdown(accelerator)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and returns.

    Every rank checks the flags of all ranks at each step boundary, so all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def agreed(self, comm: Comm) -> bool:
        """True on every rank when any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0])
        return bool(comm.all_reduce_sum(flag)[0] > 0)


def _train(cfg: Config, accelerator: Any, stop: StopRequest) -> RunResult:
    comm = Comm()
    validate(cfg, comm.world_size)
    run_dir = Path(cfg.run.output_dir)
    seed_everything(derive_seed(cfg.run.seed, 0, 0, 0, comm.rank))

    with accelerator.main_process_first():  # built-in sources are materialised once
        train_ds = load_split(cfg.data)
    if cfg.data.on_bad_image == "skip":
        train_ds = drop_undecodable(train_ds, cfg, comm)
    n = len(train_ds)
    if max(cfg.pcl.num_clusters) > n:
        raise ConfigError(
            f"pcl.num_clusters={cfg.pcl.num_clusters} asks for more clusters than the {n} "
            f"training samples: every K must be at most {n}"
        )
    local_batch = cfg.optim.batch_size // (comm.world_size * cfg.optim.grad_accum)
    two_views = train_transform(cfg.data)
    train_view = IndexedImages(train_ds, cfg.data.image_column, two_views)
    eval_view = IndexedImages(train_ds, cfg.data.image_column, eval_transform(cfg.data))
    if steps_per_epoch(cfg, n, comm.world_size, local_batch) == 0:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} x optim.grad_accum={cfg.optim.grad_accum} "
            f"needs more than the {n} training samples for one optimizer step: lower them"
        )

    # Inputs are checked: only now does the run directory get written.
    if comm.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if cfg.run.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(cfg))
    # the same initial weights and queue on every rank, whatever the engine broadcasts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, 0, 0, 0, 0))
        model = build_model(cfg)
    optimizer = torch.optim.SGD(
        [p for p in model.encoder_q.parameters()],
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    set_deepspeed_batch(accelerator, local_batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    deepspeed_settings = describe_deepspeed(accelerator)
    if deepspeed_settings:
        accelerator.print(f"DeepSpeed: {deepspeed_settings}")
    layout = Layout(distributed_kind(accelerator), comm.world_size)
    state, clusters = TrainState(), None
    resume_path = resolve_resume(cfg.run.resume, run_dir)
    if resume_path is not None:
        state, clusters = load_checkpoint(accelerator, resume_path, layout)
        clusters = clusters.to(accelerator.device) if clusters is not None else None
        accelerator.print(f"resumed from {resume_path} at epoch {state.epoch}")

    logger = JsonlLogger(run_dir / METRICS_FILE, accelerator, comm.is_main)
    extract = ExtractOptions(
        batch_size=cfg.estep.batch_size or 5 * local_batch,
        num_workers=cfg.data.num_workers,
        device=accelerator.device,
        autocast=autocast_context(accelerator, cfg),
        progress=comm.is_main,
        collective=zero_stage(accelerator) == 3,
    )
    if resume_path is None and cfg.pcl.queue_init == "keys":
        t0 = time.perf_counter()
        model.train()
        key_view = IndexedImages(train_ds, cfg.data.image_column, two_views.transform)
        fill_queue(cfg, _unwrap(accelerator, model), key_view, comm, local_batch,
                   autocast_context(accelerator, cfg))  # fmt: skip
        logger.log({"event": "queue_fill", "seconds": time.perf_counter() - t0}, 0)
    start_epoch = state.epoch
    for epoch in range(start_epoch, cfg.optim.epochs):
        mid_epoch = state.step_in_epoch > 0  # resumed from a mid-epoch checkpoint
        if epoch < cfg.pcl.warmup_epochs:
            clusters = None
        elif not (mid_epoch and clusters is not None):  # else: this epoch's saved E-step result
            clusters = estep(
                cfg, accelerator, model, eval_view, comm, extract, logger, epoch, state
            )
        loader = make_loader(
            cfg,
            train_view,
            comm,
            local_batch,
            epoch,
            skip=state.step_in_epoch * cfg.optim.grad_accum,
        )
        steps = steps_per_epoch(cfg, n, comm.world_size, local_batch)
        ctx = EpochContext(
            cfg, accelerator, model, optimizer, clusters, comm, logger, state, epoch, steps, layout
        )
        if not train_one_epoch(ctx, loader, stop, run_dir):
            accelerator.print(
                f"stopped by signal {stop.signal} at step {state.global_step}; resume with "
                f"run.resume=auto (run directory {run_dir})"
            )
            return RunResult(
                run_dir, epoch - start_epoch, logger.records, clusters, interrupted=True
            )
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if cfg.run.knn_every and state.epoch % cfg.run.knn_every == 0:
            knn = monitor_knn(cfg, accelerator, model, comm, extract, train_ds)
            if knn is not None:
                logger.log({"event": "knn", "epoch": epoch, **knn}, step=state.global_step)
        last = state.epoch == cfg.optim.epochs
        if last or state.epoch % cfg.run.checkpoint_every == 0:
            save_checkpoint(
                accelerator, run_dir, state, clusters, cfg.run.keep_checkpoints, comm, layout
            )
        if cfg.run.export_every and state.epoch % cfg.run.export_every == 0 and not last:
            weights = model_state(accelerator, model)
            if comm.is_main:
                export_backbone(weights, cfg, run_dir / f"export_epoch_{state.epoch:04d}")
            comm.barrier()

    evaluation = None
    if cfg.run.evaluate and cfg.data.label_column:
        evaluation = evaluate(cfg, accelerator, model, comm, extract, train_ds)
        if evaluation is not None:
            logger.log({"event": "evaluation", **_flatten_eval(evaluation)}, step=state.global_step)
    export_dir = None
    weights = model_state(accelerator, model)
    if comm.is_main:
        export_dir = export_backbone(weights, cfg, run_dir / "export", _flatten_eval(evaluation))
        if cfg.run.hub_repo_id:
            push_to_hub(export_dir, cfg.run.hub_repo_id)
    comm.barrier()
    if cfg.run.trackers:
        accelerator.end_training()
    return RunResult(
        run_dir=run_dir,
        epochs_run=cfg.optim.epochs - start_epoch,
        history=logger.records,
        clusters=clusters,
        evaluation=evaluation,
        export_dir=export_dir,
    )


def drop_undecodable(ds: Any, cfg: Config, comm: Comm) -> Any:
    """Decode every image once (sharded over ranks) and keep those that decode."""
    found = comm.all_gather_object(
        undecodable_indices(ds, cfg.data.image_column, comm.rank, comm.world_size)
    )
    bad = sorted(i for part in found for i in part)  # type: ignore[attr-defined]
    if not bad:
        return ds
    if len(bad) == len(ds):
        raise DataError(f"none of the {len(ds)} images of {cfg.data.source!r} decodes")
    if comm.is_main:
        more = " ..." if len(bad) > 20 else ""
        warnings.warn(
            f"skipping {len(bad)} of {len(ds)} images that do not decode "
            f"(data.on_bad_image=skip); dataset indices: {bad[:20]}{more}",
            stacklevel=2,
        )
    bad_set = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in bad_set])


def build_model(cfg: Config) -> PCLModel:
    m = cfg.model
    spec = BackboneSpec(m.backbone, m.small_stem, cfg.data.image_size, m.patch_size)
    return PCLModel(spec, m.dim, m.head, cfg.pcl.queue_length, m.mlp_hidden_dim or None)  # type: ignore[arg-type]


def model_state(accelerator: Any, model: Any) -> dict[str, Tensor]:
    """The full model state on the main process (collective: call on every rank).

    Under ZeRO-3 the partitioned weights are consolidated on the main process (other ranks get
    an empty result); otherwise it is the local state dict, whose tensors alias the weights.
    """
    sync_buffers(_unwrap(accelerator, model), Comm())
    if zero_stage(accelerator) == 3:
        return accelerator.get_state_dict(model) or {}
    return _unwrap(accelerator, model).state_dict()


def sync_buffers(model: PCLModel, comm: Comm) -> None:
    """Rank 0's BatchNorm running statistics on every rank.

    Training forwards use batch statistics; the E-step, evaluation and export read the running
    ones, so they are made identical across ranks first. DDP broadcasts buffers only at the start
    of its forward (each rank's key encoder then updates its own), and DeepSpeed never does.
    """
    comm.broadcast_buffers(model, src=0)


def _unwrap(accelerator: Any, model: Any) -> PCLModel:
    inner = accelerator.unwrap_model(model)
    assert isinstance(inner, PCLModel)
    return inner


def make_loader(
    cfg: Config, view: IndexedImages, comm: Comm, local_batch: int, epoch: int, skip: int = 0
) -> DataLoader:
    """This rank's shuffled loader for one epoch; order and augmentations follow (seed, epoch).

    ``skip`` micro-batches are dropped from the front (a mid-epoch resume): the order of the rest
    is unchanged, and the RNG state restored from the checkpoint continues the augmentations.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        view,
        num_replicas=comm.world_size,
        rank=comm.rank,
        shuffle=True,
        seed=cfg.run.seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    if skip == 0:
        seed_everything(derive_seed(cfg.run.seed, 1, epoch, 0, comm.rank))  # workers=0 views
    order = list(sampler)[skip * local_batch :]
    return DataLoader(
        view,
        batch_size=local_batch,
        sampler=order,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(
            derive_seed(cfg.run.seed, 2, epoch, skip, comm.rank)
        ),
        persistent_workers=False,
    )


# ---------------------------------------------------------------------------------------------
# E-step


def estep(
    cfg: Config,
    accelerator: Any,
    model: Any,
    eval_view: IndexedImages,
    comm: Comm,
    extract: ExtractOptions,
    logger: JsonlLogger,
    epoch: int,
    state: TrainState,
) -> ClusterResult:
    """Momentum-encoder features of the eval view, k-means at every granularity, phi."""
    start = time.perf_counter()
    inner = _unwrap(accelerator, model)
    sync_buffers(inner, comm)
    inner.eval()
    kmeans_kwargs = dict(
        niter=cfg.estep.niter,
        nredo=cfg.estep.nredo,
        spherical=cfg.estep.spherical,
        seed=cfg.estep.seed,
        backend=cfg.estep.backend,
        init=cfg.estep.init,
    )
    mode = choose_mode(
        cfg.estep.mode,
        len(eval_view),
        cfg.model.dim,
        comm.world_size,
        cfg.estep.backend != "torch" and faiss_available(),
        int(cfg.estep.gather_max_gib * 2**30),
    )
    clusters = run_estep(
        inner.embed,
        eval_view,
        comm,
        extract,
        cfg.pcl.num_clusters,
        cfg.pcl.temperature,
        kmeans_kwargs,
        mode,
    )
    inner.train()
    record: dict[str, Any] = {
        "event": "estep",
        "epoch": epoch,
        "mode": mode,
        "seconds": time.perf_counter() - start,
    }
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    for m, c in enumerate(clusters.clusterings):
        sizes = torch.bincount(c.assignments.long(), minlength=c.num_prototypes).float()
        record[f"k{m}_empty"] = int((sizes == 0).sum())
        record[f"k{m}_max_size"] = int(sizes.max())
        phi = c.phi.float().cpu()
        for q, size_q, phi_q in zip(
            (10, 50, 90), sizes.cpu().quantile(quantiles), phi.quantile(quantiles), strict=True
        ):
            record[f"k{m}_size_p{q}"] = float(size_q)
            record[f"k{m}_phi_p{q}"] = float(phi_q)
        record[f"k{m}_phi_min"] = float(phi.min())
        record[f"k{m}_phi_max"] = float(phi.max())
    logger.log(record, step=state.global_step)
    return clusters.to(accelerator.device)


# ---------------------------------------------------------------------------------------------
# M-step


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
    autocast: Callable[[], Any] = field(init=False)

    def __post_init__(self) -> None:
        self.autocast = autocast_context(self.accelerator, self.cfg)


def steps_per_epoch(cfg: Config, n: int, world_size: int, local_batch: int) -> int:
    """Optimizer steps per epoch: full local batches of this rank's share, over accumulation."""
    steps = (n // world_size) // local_batch // cfg.optim.grad_accum  # DistributedSampler drop_last
    return min(steps, cfg.run.max_steps_per_epoch) if cfg.run.max_steps_per_epoch else steps


def train_one_epoch(
    ctx: EpochContext, loader: DataLoader, stop: StopRequest, run_dir: Path
) -> bool:
    """M-step iterations of one epoch, from ``state.step_in_epoch`` on.

    Returns False when a stop signal ended the epoch early (after saving a checkpoint).
    """
    cfg, state, comm = ctx.cfg, ctx.state, ctx.comm
    inner = _unwrap(ctx.accelerator, ctx.model)
    ctx.model.train()
    accum = cfg.optim.grad_accum
    steps = ctx.steps
    meter = Meter(ctx.accelerator.device)
    bar = tqdm(
        total=steps,
        initial=state.step_in_epoch,
        desc=f"epoch {ctx.epoch}",
        disable=not comm.is_main,
        leave=False,
    )
    lr = cfg.optim.lr
    for micro, ((im_q, im_k), index) in enumerate(loader):
        done = state.step_in_epoch  # optimizer steps finished in this epoch
        if done >= steps:
            break
        if micro % accum == 0:
            inner.momentum_update(cfg.pcl.momentum)
            lr = learning_rate(
                cfg.optim.lr,
                ctx.epoch + done / max(steps, 1),
                cfg.optim.epochs,
                cfg.optim.schedule,
                cfg.optim.milestones,
                cfg.optim.gamma,
            )
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
        out = train_step(ctx, inner, im_q, im_k, index, micro % accum)
        meter.add(out, state.global_step + 1)
        if (micro + 1) % accum:
            continue
        state.global_step += 1
        state.step_in_epoch += 1
        bar.update(1)
        finished = state.step_in_epoch == steps
        if state.global_step % cfg.run.log_every == 0 or finished:
            record = meter.summary(ctx.accelerator, comm, run_dir)
            record.update(epoch=ctx.epoch, step=state.global_step, lr=lr)
            # mean cosine between queued keys (self-pairs included): near 1 means collapse
            record["queue_mean_cos"] = float(inner.queue.float().mean(dim=0).pow(2).sum())
            ctx.logger.log(record, step=state.global_step)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            meter = Meter(ctx.accelerator.device)
        if finished:
            break
        every = cfg.run.checkpoint_every_steps
        stopping = stop.agreed(comm)
        if stopping or (every and state.global_step % every == 0):
            meter.raise_if_diverged(comm, run_dir)  # never checkpoint a diverged model
            save_checkpoint(
                ctx.accelerator,
                run_dir,
                state,
                ctx.clusters,
                cfg.run.keep_checkpoints,
                comm,
                ctx.layout,
            )
        if stopping:
            bar.close()
            return False
    bar.close()
    return True


def train_step(
    ctx: EpochContext, inner: PCLModel, im_q: Tensor, im_k: Tensor, index: Tensor, micro: int
) -> LossOutput:
    """One micro-batch: keys (shuffled BN across ranks), loss, backward, step, enqueue.

    ``micro`` is the micro-batch's place in its accumulation window: each micro-batch of an
    optimizer step gets its own key shuffle and negative-prototype draw.
    """
    cfg, accelerator, comm = ctx.cfg, ctx.accelerator, ctx.comm
    device = accelerator.device
    im_q, im_k, index = im_q.to(device), im_k.to(device), index.to(device)
    step_seed = derive_seed(cfg.run.seed, 3, ctx.epoch, ctx.state.global_step, micro)
    with accelerator.accumulate(ctx.model), ctx.autocast():
        q, _ = ctx.model(im_q)
        k = shuffled_keys(inner.embed, im_k, comm, torch.Generator().manual_seed(step_seed))
        gen = torch.Generator(device=device).manual_seed(derive_seed(step_seed, comm.rank))
        out = pcl_loss(q, k, inner.queue, index, cfg.pcl.temperature, ctx.clusters, cfg.pcl.r, gen)
        accelerator.backward(out.loss)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    inner.enqueue(comm.all_gather_cat(k.float()))
    return out


def fill_queue(
    cfg: Config,
    inner: PCLModel,
    view: IndexedImages,
    comm: Comm,
    local_batch: int,
    autocast: Callable[[], Any],
) -> None:
    """Fill the whole queue with keys of real training images before the first step.

    The reference starts from random unit vectors. Random negatives are nearly orthogonal to
    every query, so the first steps only pull each query towards its key; as an untrained
    encoder's embeddings share a large common component, that pulls all of them together, the
    momentum encoder follows, and the queue then fills with nearly identical keys, from which
    a short or small-data run does not recover (the digits recipe ends with a mean cosine of
    0.9999 between queued keys and ProtoNCE at chance; with this fill, 0.02). Here the key
    encoder embeds a seeded random draw of key views (shuffled BatchNorm as in training, the
    same batches on every rank), the keys are all-gathered and fill the queue, pointer at 0.

    ``view`` yields ``(key view, index)``: one augmentation per image, not the training pair.
    """
    size = inner.queue.shape[0]
    global_batch = local_batch * comm.world_size
    batches = -(-size // global_batch)
    g = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 4, 0, 0, 0))
    rounds = -(-batches * global_batch // len(view))  # a queue longer than the dataset repeats it
    order = torch.cat([torch.randperm(len(view), generator=g) for _ in range(rounds)])
    mine = order[: batches * global_batch].view(batches, comm.world_size, local_batch)[:, comm.rank]
    loader = DataLoader(
        view,
        batch_size=local_batch,
        sampler=mine.flatten().tolist(),
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(derive_seed(cfg.run.seed, 4, 0, 1, comm.rank)),
    )
    device = inner.queue.device
    keys = []
    with torch.no_grad(), autocast():
        for step, (im_k, _) in enumerate(loader):
            gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 4, 1, step, 0))
            k = shuffled_keys(inner.embed, im_k.to(device), comm, gen)
            keys.append(comm.all_gather_cat(k.float()))  # (global batch, D)
    inner.queue_ptr.zero_()
    inner.enqueue(torch.cat(keys)[:size])  # a full turn: the pointer is back at 0


def shuffled_keys(
    encode: Callable[[Tensor], Tensor], im_k: Tensor, comm: Comm, gen: torch.Generator
) -> Tensor:
    """Keys with shuffled BatchNorm (MoCo): each rank encodes a random slice of the global batch.

    The permutation comes from a generator seeded identically on every rank, so no broadcast is
    needed. On one process this is the plain key forward.
    """
    if comm.world_size == 1:
        return encode(im_k)
    b = im_k.shape[0]
    all_k = comm.all_gather_cat(im_k)  # (W*B, C, H, W)
    perm = torch.randperm(all_k.shape[0], generator=gen).to(im_k.device)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    keys = comm.all_gather_cat(encode(all_k[perm[mine]]).contiguous())  # (W*B, D), shuffled order
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return unshuffled[mine]


class Meter:
    """Sums of the logged terms over a logging interval, kept on the device (no per-step sync).

    It also remembers the first step whose loss was not finite; :meth:`summary` (and
    :meth:`raise_if_diverged`) stop the run there, before anything else is saved.
    """

    KEYS = ("loss", "loss_inst", "loss_proto", "acc_inst", "acc_proto")

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.first_bad = torch.full((1,), -1, dtype=torch.long, device=device)

    def add(self, out: LossOutput, step: int) -> None:
        self.count += 1
        for key in self.KEYS:
            value = getattr(out, key)
            if value is not None:
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        bad = ~torch.isfinite(out.loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def raise_if_diverged(self, comm: Comm, run_dir: Path) -> None:
        steps = [int(s) for s in comm.all_gather_cat(self.first_bad.cpu()) if s >= 0]
        if steps:
            last = find_latest(run_dir)
            raise DivergedError(
                f"the loss became NaN or Inf at step {min(steps)}: training stopped without "
                f"saving. Last good checkpoint: {last or 'none'}. Resume from it "
                f"(run.resume=auto) with a lower optim.lr, or with run.mixed_precision='no'."
            )

    def summary(self, accelerator: Any, comm: Comm, run_dir: Path) -> dict[str, Any]:
        self.raise_if_diverged(comm, run_dir)
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        mean = (
            accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
        )
        return {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}


# ---------------------------------------------------------------------------------------------
# Final evaluation


def evaluate(
    cfg: Config, accelerator: Any, model: Any, comm: Comm, extract: ExtractOptions, train_ds: Any
) -> dict[str, dict[str, float]] | None:
    """kNN (k=5, cosine) and k-means NMI/AMI of the backbone features vs raw pixels (rank 0).

    The kNN gallery is the training split and the queries are ``data.eval_split``; k-means runs
    on the union. Without an eval split only k-means on the training split is reported. Raw
    pixels are the same eval view, flattened (skipped when too large to hold).
    """
    splits = [train_ds] + (
        [load_split(cfg.data, cfg.data.eval_split)] if cfg.data.eval_split else []
    )
    pixels = 3 * cfg.data.image_size**2
    with_raw = pixels * sum(len(ds) for ds in splits) <= RAW_BASELINE_MAX_VALUES
    learned, raw, labels = labelled_features(
        cfg, accelerator, model, comm, extract, splits, with_raw
    )
    report = None
    if comm.is_main:
        with comm.idle_host_threads():  # the other ranks wait at the barrier below
            report = {
                name: representation_scores(
                    [f for f in feats if f is not None], labels, k=5, seed=cfg.run.seed
                )  # rank 0 holds every split
                for name, feats in (("raw pixels", raw), ("pcl backbone", learned))
                if feats
            }
        save_embedding_sample(
            Path(cfg.run.output_dir), [f for f in learned if f is not None], labels, cfg.run.seed
        )
    comm.barrier()
    return report


def save_embedding_sample(
    run_dir: Path, feats: list[Tensor], labels: list[Tensor], seed: int, limit: int = 10_000
) -> None:
    """A seeded random sample of the final backbone features with labels, for the run report."""
    from safetensors.torch import save_file

    x, y = torch.cat(feats).float(), torch.cat(labels).long()
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
    save_file(
        {"features": x[keep].contiguous(), "labels": y[keep].contiguous()},
        str(run_dir / EMBEDDINGS_FILE),
    )


def monitor_knn(
    cfg: Config, accelerator: Any, model: Any, comm: Comm, extract: ExtractOptions, train_ds: Any
) -> dict[str, float] | None:
    """kNN of the online backbone during training (rank 0's result; None elsewhere or unlabelled).

    The gallery is the training split, the queries ``data.eval_split``; both through the
    deterministic eval view, extracted sharded like the E-step.
    """
    if not (cfg.data.label_column and cfg.data.eval_split):
        return None
    splits = [train_ds, load_split(cfg.data, cfg.data.eval_split)]
    feats, _, labels = labelled_features(cfg, accelerator, model, comm, extract, splits, False)
    knn = None
    if comm.is_main:
        (gallery, queries), (gallery_labels, query_labels) = feats, labels
        assert gallery is not None and queries is not None
        with comm.idle_host_threads():  # the other ranks wait at the barrier below
            knn = knn_scores(gallery, gallery_labels, queries, query_labels)
    comm.barrier()
    return knn


def labelled_features(
    cfg: Config,
    accelerator: Any,
    model: Any,
    comm: Comm,
    extract: ExtractOptions,
    splits: list[Any],
    with_raw: bool,
) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor]]:
    """Online-backbone features (and raw pixels) of each split's eval view, with labels.

    Features are extracted sharded and assembled on rank 0 (None elsewhere), after rank 0's
    BatchNorm statistics are made everyone's.
    """
    inner = _unwrap(accelerator, model)
    sync_buffers(inner, comm)
    inner.eval()
    opts = dataclasses.replace(extract, progress=False)
    learned: list[Tensor | None] = []
    raw: list[Tensor | None] = []
    labels = []
    for ds in splits:
        view = IndexedImages(ds, cfg.data.image_column, eval_transform(cfg.data))
        learned.append(extract_all(inner.encoder_q.backbone, view, comm, opts))
        if with_raw:
            raw.append(extract_all(torch.nn.Flatten(), view, comm, opts))
        lab = labels_of(ds, cfg.data)
        assert lab is not None
        labels.append(lab)
    inner.train()
    return learned, raw, labels


def _flatten_eval(evaluation: dict[str, dict[str, float]] | None) -> dict[str, float]:
    if not evaluation:
        return {}
    return {
        f"{name.replace(' ', '_')}/{k}": v
        for name, row in evaluation.items()
        for k, v in row.items()
    }


def _flat(cfg: Config) -> dict[str, Any]:
    from pcl_scale.config import to_dict

    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = (
                value if isinstance(value, int | float | str | bool) else str(value)
            )
    return out


def format_report(evaluation: dict[str, dict[str, float]]) -> str:
    """The learned-vs-raw table printed at the end of a run."""
    lines = ["| features | kNN top-1 (k=5) | k-means NMI | k-means AMI |", "|---|---|---|---|"]
    for name, row in evaluation.items():
        knn = f"{row['knn_top1']:.1f}%" if "knn_top1" in row else "-"
        lines.append(f"| {name} | {knn} | {row['nmi']:.3f} | {row['ami']:.3f} |")
    return "\n".join(lines)


__all__ = ["RunResult", "format_report", "train"]
