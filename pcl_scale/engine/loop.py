"""The PCL training loop on Accelerate, as a list of named calls.

:func:`train` builds a :class:`Run` once (:func:`setup`), then every epoch runs the E-step when
one is due (:func:`maybe_estep`: every ``estep.every`` epochs), the M-step iterations
(``mstep.train_one_epoch``) and the epoch's bookkeeping (:func:`end_of_epoch`); :func:`finish`
evaluates, exports and returns what the run measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pcl_scale.artifacts import METRICS_FILE, InitialWeights, TrainState, read_initial_weights
from pcl_scale.config import Config, ConfigError, local_batch_size, save_config, steps_per_epoch
from pcl_scale.core.clusters import ClusterResult
from pcl_scale.core.kmeans import KMeansOptions, resolve_backend
from pcl_scale.core.model import PCLModel
from pcl_scale.data import (
    DeviceInput,
    IndexedImages,
    device_input,
    eval_transform,
    load_split,
    train_transform,
)
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.estep import ClusteringPlan, choose_mode, estep
from pcl_scale.distributed.extract import ExtractOptions, StopRequestedError
from pcl_scale.engine.checkpoint import Layout, agreed_resume, load_checkpoint, save_checkpoint
from pcl_scale.engine.evaluate import evaluate, monitor_knn
from pcl_scale.engine.export import backbone_spec, check_hub_access, export_backbone, push_export
from pcl_scale.engine.keys import fill_queue
from pcl_scale.engine.loaders import (
    EpochLoader,
    augmented_view,
    drop_undecodable,
    loader_options,
)
from pcl_scale.engine.mstep import EpochContext, train_one_epoch
from pcl_scale.engine.runtime import (
    autocast_context,
    describe_deepspeed,
    distributed_kind,
    make_accelerator,
    model_state,
    resolve_precision,
    set_deepspeed_batch,
    shutdown,
    speed_up,
    sync_buffers,
    unwrap,
    uses_channels_last,
    zero_stage,
)
from pcl_scale.engine.seeding import (
    SeedStream,
    derive_seed,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from pcl_scale.engine.signals import StopRequest
from pcl_scale.engine.tracking import JsonlLogger, flat_config, phase
from pcl_scale.evaluation.tables import flatten_evaluation
from pcl_scale.validation import validate, validate_for_data


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


@dataclass
class Run:
    """Everything the loop works with, built once by :func:`setup`."""

    cfg: Config
    accelerator: Any
    comm: Comm
    stop: StopRequest
    train_ds: Any
    model: Any
    optimizer: Any
    layout: Layout
    logger: JsonlLogger
    extract: ExtractOptions
    state: TrainState
    clusters: ClusterResult | None
    resumed: bool
    input: DeviceInput  # uint8 views to normalised (channels-last) device batches
    views: dict[str, IndexedImages] = field(default_factory=dict)  # built once per run

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def local_batch(self) -> int:
        return local_batch_size(self.cfg, self.comm.world_size)

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.cfg, len(self.train_ds), self.comm.world_size)

    def estep_view(self) -> IndexedImages:
        """The E-step's deterministic view, one object per run (its loader and workers persist)."""
        if "estep" not in self.views:
            view = IndexedImages(self.train_ds, self.cfg.data.image_column,
                                 eval_transform(self.cfg.data))  # fmt: skip
            self.views["estep"] = view
        return self.views["estep"]


def train(cfg: Config) -> RunResult:
    """Train PCL as configured; returns where the run wrote its outputs and what it measured."""
    accelerator = make_accelerator(cfg)
    try:
        with StopRequest() as stop:
            return run_epochs(setup(cfg, accelerator, stop))
    finally:
        shutdown(accelerator)


def run_epochs(run: Run) -> RunResult:
    """The epochs from where the run stands, then :func:`finish`."""
    start_epoch = run.state.epoch
    train_view = augmented_view(run.cfg, run.train_ds, train_transform(run.cfg.data),
                                SeedStream.AUGMENT)  # fmt: skip
    batches = EpochLoader(run.cfg, train_view, run.comm, run.local_batch, run.input.device)
    for epoch in range(start_epoch, run.cfg.optim.epochs):
        before_estep = rng_state()
        try:
            run.clusters = maybe_estep(run, epoch)
        except StopRequestedError:  # resumable as if the E-step had not begun
            restore_rng_state(before_estep)
            save(run)
            return interrupted(run, epoch - start_epoch)
        skip = run.state.step_in_epoch * run.cfg.optim.grad_accum  # a mid-epoch resume
        ctx = epoch_context(run, epoch)
        if not train_one_epoch(
            ctx, batches.epoch(epoch, skip), run.stop, run.run_dir
        ):  # stopped by a signal
            return interrupted(run, epoch - start_epoch)
        if not end_of_epoch(run, epoch):  # stopped during the kNN check
            return interrupted(run, epoch + 1 - start_epoch)
    return finish(run, start_epoch)


def setup(cfg: Config, accelerator: Any, stop: StopRequest) -> Run:
    """Check inputs, then build data, model, optimizer and logger, resuming when asked."""
    comm = Comm()
    validate(cfg, comm.world_size)
    if cfg.run.hub_repo_id:  # before training, not hours later
        check_hub_access("or leave run.hub_repo_id='' and upload later with pcl-scale push")
    seed_everything(derive_seed(cfg.run.seed, SeedStream.SETUP, 0, 0, comm.rank))
    train_ds = load_training_set(cfg, accelerator, comm)
    validate_for_data(cfg, len(train_ds), comm.world_size)
    checkpoint = agreed_resume(cfg.run.resume, Path(cfg.run.output_dir), comm)
    fresh = checkpoint is None  # a resumed run's weights come from its checkpoint, not init_from
    model, optimizer = prepare_model(
        cfg, accelerator, local_batch_size(cfg, comm.world_size), fresh
    )
    run_dir = Path(cfg.run.output_dir)  # inputs and initial weights are checked: now write
    if comm.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if cfg.run.trackers:
        accelerator.init_trackers(run_dir.name, config=flat_config(cfg))
    layout = Layout(distributed_kind(accelerator), comm.world_size)
    state, clusters, resumed = resume(checkpoint, accelerator, layout)
    to_input = device_input(cfg.data, accelerator.device, uses_channels_last(cfg, accelerator))
    run = Run(
        cfg, accelerator, comm, stop, train_ds, model, optimizer, layout,
        JsonlLogger(run_dir / METRICS_FILE, accelerator, comm.is_main),
        extract_options(cfg, accelerator, comm, stop, to_input), state, clusters, resumed,
        to_input,
    )  # fmt: skip
    precision = resolve_precision(cfg)  # the run's record says what ran, not only "auto"
    run.logger.log({"event": "precision", "precision": precision.value,
                    "reason": precision.reason}, state.global_step)  # fmt: skip
    if not resumed and cfg.pcl.queue_init == "keys":
        initial_queue(run)
    return run


def load_training_set(cfg: Config, accelerator: Any, comm: Comm) -> Any:
    """The training split (built-in sources materialised once), undecodable images dropped."""
    with accelerator.main_process_first():
        train_ds = load_split(cfg.data)
    if cfg.data.on_bad_image == "skip":
        train_ds = drop_undecodable(train_ds, cfg, comm)
    return train_ds


def build_model(
    cfg: Config, log: Callable[[str], None] = print, initial_weights: bool = True
) -> PCLModel:
    """The PCL model, started from ``model.init_from``'s weights when it names any (and
    ``initial_weights``: a resumed run loads its checkpoint instead)."""
    m = cfg.model
    head: Any = m.head  # validated: 'linear' or 'mlp'
    model = PCLModel(
        backbone_spec(cfg), m.dim, head, cfg.pcl.queue_length, m.mlp_hidden_dim or None
    )
    if m.init_from and initial_weights:
        start_from(model, read_initial_weights(m.init_from), log)
    return model


def start_from(model: PCLModel, weights: InitialWeights, log: Callable[[str], None]) -> None:
    """Both encoders from ``weights``: the backbone always, the head when it has this model's
    shapes (another head kind or size starts random, and the log says so)."""
    head = weights.head
    own_head = model.encoder_q.head.state_dict()
    if head is not None and {k: v.shape for k, v in head.items()} != {
        k: v.shape for k, v in own_head.items()
    }:
        log(f"model.init_from: the head of {weights.source} has other shapes; it starts random")
        head = None
    try:
        model.start_from(weights.backbone, weights.source, head)
    except ValueError as err:
        raise ConfigError(f"model.init_from: {err}") from err
    loaded = "backbone and head" if head is not None else "backbone"
    log(f"model.init_from: {loaded} from {weights.source}")


def prepare_model(
    cfg: Config, accelerator: Any, local_batch: int, initial_weights: bool = True
) -> tuple[Any, Any]:
    """The model (same initial weights and queue on every rank) and SGD, prepared."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, SeedStream.SETUP, 0, 0, 0))
        model = build_model(cfg, accelerator.print, initial_weights)
    optimizer = torch.optim.SGD(
        [p for p in model.encoder_q.parameters()],
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    faster = speed_up(model, cfg, accelerator)
    if faster:
        accelerator.print(f"encoders: {', '.join(faster)}")
    set_deepspeed_batch(accelerator, local_batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    deepspeed_settings = describe_deepspeed(accelerator)
    if deepspeed_settings:
        accelerator.print(f"DeepSpeed: {deepspeed_settings}")
    return model, optimizer


def resume(
    path: Path | None, accelerator: Any, layout: Layout
) -> tuple[TrainState, ClusterResult | None, bool]:
    """The checkpoint ``run.resume`` names (rank 0's choice, agreed), restored; else a fresh
    state."""
    if path is None:
        return TrainState(), None, False
    state, clusters = load_checkpoint(accelerator, path, layout)
    clusters = clusters.to(accelerator.device) if clusters is not None else None
    accelerator.print(f"resumed from {path} at epoch {state.epoch}")
    return state, clusters, True


def extract_options(
    cfg: Config, accelerator: Any, comm: Comm, stop: StopRequest, to_input: DeviceInput
) -> ExtractOptions:
    """How the E-step and evaluation run the encoders over a dataset (a stop ends them); the
    loaders of views seen again (the E-step's) are kept with their workers."""
    return ExtractOptions(
        stop=lambda: stop.agreed(comm),
        batch_size=cfg.estep.batch_size or 5 * local_batch_size(cfg, comm.world_size),
        num_workers=cfg.data.num_workers,
        device=accelerator.device,
        autocast=autocast_context(accelerator, cfg),
        progress=comm.is_main,
        collective=zero_stage(accelerator) == 3,
        to_input=to_input,
        loader_options=loader_options(cfg, accelerator.device),
        cache={},
    )


def initial_queue(run: Run) -> None:
    """Fill the queue with keys of training images (``pcl.queue_init=keys``), timed in the log."""
    t0 = time.perf_counter()
    run.model.train()
    key_view = augmented_view(run.cfg, run.train_ds, train_transform(run.cfg.data).transform,
                              SeedStream.QUEUE_FILL)  # fmt: skip
    fill_queue(run.cfg, unwrap(run.accelerator, run.model), key_view, run.comm, run.local_batch,
               autocast_context(run.accelerator, run.cfg), run.input)  # fmt: skip
    run.logger.log({"event": "queue_fill", "seconds": time.perf_counter() - t0}, 0)


def estep_due(run: Run, epoch: int) -> bool:
    """Every ``estep.every`` epochs from the end of the warm-up, and whenever the run has no
    prototypes yet (a resume saved without them); never again in an epoch resumed mid-way with
    its E-step saved."""
    if run.clusters is None:
        return True
    resumed_mid_epoch = run.state.step_in_epoch > 0
    return not resumed_mid_epoch and (epoch - run.cfg.pcl.warmup_epochs) % run.cfg.estep.every == 0


def maybe_estep(run: Run, epoch: int) -> ClusterResult | None:
    """This epoch's prototypes: None during warm-up, else a new (or the resumed) E-step result."""
    if epoch < run.cfg.pcl.warmup_epochs:
        return None
    if not estep_due(run, epoch):
        return run.clusters
    inner = unwrap(run.accelerator, run.model)
    sync_buffers(inner, run.comm)
    inner.eval()
    eval_view = run.estep_view()
    plan, choices = clustering_plan(run)
    if not any(r.get("event") == "estep" for r in run.logger.records):  # once per process
        mode, backend = choices["mode_reason"], choices["backend_reason"]
        run.accelerator.print(
            f"E-step: {plan.mode} mode ({mode}); {choices['backend']} ({backend})"
        )
    with phase(run.logger, run.comm, "estep", run.state.global_step):
        report = estep(inner.embed, eval_view, run.comm, run.extract, plan)
    inner.train()
    record = {"event": "estep", "epoch": epoch, **report.record, **choices}
    run.logger.log(record, run.state.global_step)
    return report.clusters.to(run.accelerator.device)


def clustering_plan(run: Run) -> tuple[ClusteringPlan, dict[str, str]]:
    """The E-step's settings from the config, ``auto`` resolved, and the reasons for each choice."""
    e = run.cfg.estep
    device = run.extract.device
    backend, backend_reason = resolve_backend(e.backend, device)
    mode, mode_reason = choose_mode(
        e.mode, len(run.train_ds), run.cfg.model.dim, run.comm.world_size, backend, device,
        int(e.gather_max_gib * 2**30),
    )  # fmt: skip
    if mode == "sharded":
        backend = "torch"  # the sharded k-means is the torch backend's
        backend_reason += "; sharded mode runs the torch backend"
    kmeans = KMeansOptions(
        niter=e.niter,
        nredo=e.nredo,
        spherical=e.spherical,
        seed=e.seed,
        backend=backend,  # type: ignore[arg-type]
        init=e.init,  # type: ignore[arg-type]
        faiss_gpus=tuple(e.faiss_gpus),
    )
    pcl = run.cfg.pcl
    plan = ClusteringPlan(
        tuple(pcl.num_clusters), pcl.temperature, kmeans, mode, pcl.concentration == "fixed"
    )
    return plan, {"backend": backend, "backend_reason": backend_reason, "mode_reason": mode_reason}


def epoch_context(run: Run, epoch: int) -> EpochContext:
    return EpochContext(
        run.cfg, run.accelerator, run.model, run.optimizer, run.clusters, run.comm,
        run.logger, run.state, epoch, run.steps, run.layout, run.input,
    )  # fmt: skip


def end_of_epoch(run: Run, epoch: int) -> bool:
    """Advance the state; the kNN monitor, checkpoint and export on their cadences.

    Returns False when a stop was agreed during the kNN check: the epoch's checkpoint is saved
    (the check is skipped; it draws nothing from the training RNG, so the resumed run is the same).
    """
    cfg, state = run.cfg, run.state
    state.epoch, state.step_in_epoch = epoch + 1, 0
    if cfg.run.knn_every and state.epoch % cfg.run.knn_every == 0:
        try:
            knn_check(run, epoch)
        except StopRequestedError:
            save(run)
            return False
    last = state.epoch == cfg.optim.epochs
    if last or state.epoch % cfg.run.checkpoint_every == 0:
        with phase(run.logger, run.comm, "checkpoint", state.global_step):
            save(run)
    if cfg.run.export_every and state.epoch % cfg.run.export_every == 0 and not last:
        with phase(run.logger, run.comm, "export", state.global_step):
            publish(run, run.run_dir / f"export_epoch_{state.epoch:04d}")
    return True


def knn_check(run: Run, epoch: int) -> None:
    """The kNN monitor of ``run.knn_every``, timed and logged (a stop ends it)."""
    with phase(run.logger, run.comm, "knn", run.state.global_step):
        knn = monitor_knn(run.cfg, run.accelerator, run.model, run.comm, run.extract,
                          run.train_ds)  # fmt: skip
    if knn is not None:
        run.logger.log({"event": "knn", "epoch": epoch, **knn}, step=run.state.global_step)


def publish(run: Run, out_dir: Path, metrics: dict[str, Any] | None = None) -> Path | None:
    """The export of the current weights, written by rank 0 (collective: ZeRO-3 consolidates)."""
    weights = model_state(run.accelerator, run.model)
    if not run.comm.is_main:
        return None
    return export_backbone(weights, run.cfg, out_dir, metrics)


def save(run: Run) -> None:
    """A resume checkpoint of where the run stands (collective)."""
    save_checkpoint(run.accelerator, run.run_dir, run.state, run.clusters,
                    run.cfg.run.keep_checkpoints, run.comm, run.layout)  # fmt: skip


def interrupted(run: Run, epochs_run: int) -> RunResult:
    """A run stopped by SIGTERM/SIGINT: its checkpoint is saved; say how to resume."""
    run.accelerator.print(
        f"stopped by signal {run.stop.signal} at step {run.state.global_step}; resume with "
        f"run.resume=auto (run directory {run.run_dir})"
    )
    return RunResult(run.run_dir, epochs_run, run.logger.records, run.clusters, interrupted=True)


def finish(run: Run, start_epoch: int) -> RunResult:
    """The final evaluation, the published export (and its upload), the result."""
    cfg, comm = run.cfg, run.comm
    evaluation = None
    if cfg.run.evaluate and cfg.data.label_column:
        try:  # the last epoch's checkpoint is written: a resume evaluates again
            with phase(run.logger, comm, "evaluation", run.state.global_step):
                evaluation = evaluate(cfg, run.accelerator, run.model, comm, run.extract,
                                      run.train_ds)  # fmt: skip
        except StopRequestedError:
            return interrupted(run, cfg.optim.epochs - start_epoch)
        if evaluation is not None:
            record = {"event": "evaluation", **flatten_evaluation(evaluation)}
            run.logger.log(record, step=run.state.global_step)
    with phase(run.logger, comm, "export", run.state.global_step):
        export_dir = publish(run, run.run_dir / "export", flatten_evaluation(evaluation))
    if export_dir is not None and cfg.run.hub_repo_id:
        url = push_export(export_dir, cfg.run.hub_repo_id, cfg.run.hub_private)
        run.accelerator.print(f"pushed {export_dir} to {url}")
    if cfg.run.trackers:
        run.accelerator.end_training()
    return RunResult(
        run_dir=run.run_dir,
        epochs_run=cfg.optim.epochs - start_epoch,
        history=run.logger.records,
        clusters=run.clusters,
        evaluation=evaluation,
        export_dir=export_dir,
    )


__all__ = ["RunResult", "train"]
