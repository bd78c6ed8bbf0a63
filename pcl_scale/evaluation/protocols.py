"""Evaluate a published export: kNN, linear probe, low-shot SVM and clustering, next to raw pixels.

Features come from the export alone (``model.safetensors`` + ``config.json``, rebuilt with plain
torchvision/timm), on any split of any data source, extracted sharded across processes when the
process group is initialised (``torchrun`` / ``accelerate launch``) and assembled on rank 0 by
dataset index. Every protocol runs on the learned features and on raw pixels of the same eval view
("raw pixels": the identity encoder), by the same code on the same split. With ``run_dir`` the
PCL prototypes' own assignments of the training split (from the newest checkpoint) are scored too.

Rank 0 says on stderr what it extracts (a tqdm bar on a terminal) and names each protocol as it
starts; after each protocol of each encoder, ``on_result`` gets the report so far (``pcl-scale
eval`` rewrites its JSON then, so an interrupted evaluation keeps what it finished).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcl_scale.artifacts import find_latest, load_exported_backbone, read_clusters
from pcl_scale.config import DataConfig, EvalConfig
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import (
    ExtractOptions,
    gather_by_index,
    gather_rows,
)
from pcl_scale.errors import UserError
from pcl_scale.evaluation.linear_probe import ReferenceSchedule, linear_probe, linear_reference
from pcl_scale.evaluation.lowshot import lowshot_svm
from pcl_scale.evaluation.metrics import prototype_scores_of
from pcl_scale.evaluation.progress import Progress
from pcl_scale.evaluation.sharded import Shard, sharded_kmeans_scores, sharded_knn_scores

RAW, LEARNED = "raw pixels", "pcl backbone"
Report = dict[str, dict[str, Any]]


def data_for_export(config: dict[str, Any], data: DataConfig) -> DataConfig:
    """The eval view the export was trained with: image size, resize, normalisation."""
    trained = config.get("training_config", {}).get("data", {})
    return dataclasses.replace(
        data,
        image_size=config["image_size"],
        mean=config["mean"],
        std=config["std"],
        resize_size=data.resize_size or trained.get("resize_size", 0),
    )


def prototype_assignments(run_dir: Path) -> list[np.ndarray]:
    """The newest checkpoint's assignment of every training index, per granularity."""
    ckpt = find_latest(run_dir)
    clusters = read_clusters(ckpt) if ckpt is not None else None
    if clusters is None:
        raise UserError(
            f"{run_dir} has no checkpoint with an E-step result: pass the run directory of a run "
            "that got past its warm-up epochs"
        )
    return [c.assignments.long().numpy() for c in clusters.clusterings]


@dataclass(frozen=True)
class EvalInputs:
    """What every encoder's protocols share: the splits (gallery first), their eval views and
    labels, the settings, and where the scores run."""

    data: DataConfig
    options: EvalConfig
    splits: list[Any]
    views: list[IndexedImages]
    labels: list[torch.Tensor]
    comm: Comm
    device: torch.device


@dataclass(frozen=True)
class EncoderFeatures:
    """One encoder's features as the protocols read them.

    ``parts``: this rank's rows of each split as labelled :class:`Shard` s on the device (kNN,
    k-means; empty when neither runs); ``probe``: the probes' training sample and the queries,
    with labels, on rank 0 (None elsewhere or when no probe runs).
    """

    encoder: torch.nn.Module
    parts: list[Shard]
    probe: tuple[list[torch.Tensor], list[torch.Tensor]] | None
    probe_samples: int


def evaluate_export(
    export_dir: Path,
    data: DataConfig,
    options: EvalConfig,
    comm: Comm | None = None,
    device: torch.device | None = None,
    on_result: Callable[[Report], None] | None = None,
) -> Report | None:
    """Every requested protocol for the learned features and raw pixels (rank 0; None elsewhere).

    The gallery/training split is ``data.split``, the queries ``data.eval_split``. Returns
    ``{encoder: {metric: value}}`` with flat metric names (``knn200_top1``, ``linear_top1``,
    ``lowshot_k4_mean``, ``kmeans_nmi``, ...), plus a ``prototypes`` entry with the prototypes'
    own scores when ``options.run_dir`` is set. A label column of equal-length lists is read as
    multi-label (VOC) targets: low-shot mAP only. Protocols run in the requested order; after
    each one (per encoder) rank 0 calls ``on_result`` with the report so far.
    """
    comm = comm or Comm()
    device = device or torch.device("cpu")
    progress = Progress(comm.is_main)
    model, config = load_exported_backbone(export_dir)
    model.to(device)
    data = data_for_export(config, data)
    splits = [load_split(data, data.split), load_split(data, data.eval_split)]
    labels = split_labels(splits, data)
    views = [
        IndexedImages(ds, data.image_column, eval_transform(data, as_uint8=False)) for ds in splits
    ]
    inputs = EvalInputs(data, options, splits, views, labels, comm, device)
    protocols = applicable(options.protocols, labels[0])
    report: Report = {}
    for name, encoder in ((RAW, torch.nn.Flatten()), (LEARNED, model)):
        features = encoder_features(encoder, name, inputs, protocols, progress)
        done: dict[str, Any] = {}
        for protocol in protocols:
            with progress.stage(f"{protocol} on {name}"):
                done.update(run_protocol(protocol, features, inputs))
            report[name] = ordered_row(options.protocols, protocols, done)
            if on_result is not None and comm.is_main:
                on_result(report)
    if not comm.is_main:
        return None
    if options.run_dir and labels[0].ndim == 1:
        with progress.stage("prototypes of the run"):
            report["prototypes"] = prototype_scores(Path(options.run_dir), labels[0], data.split)
        if on_result is not None:
            on_result(report)
    return report


def encoder_features(
    encoder: torch.nn.Module,
    name: str,
    inputs: EvalInputs,
    protocols: list[str],
    progress: Progress,
) -> EncoderFeatures:
    """Extract both splits through ``encoder`` (sharded; rank 0 says which), then what the
    requested protocols read: the labelled shards on the device, the probes' sample on rank 0."""
    data, comm = inputs.data, inputs.comm
    shards = []
    for split, view in zip((data.split, data.eval_split), inputs.views, strict=True):
        opts = ExtractOptions(inputs.options.batch_size, data.num_workers, inputs.device)
        what = f"extract {split} ({len(view)} images) through {name}"
        shards.append(progress.extract(encoder, view, comm, opts, what))
    parts: list[Shard] = []
    if {"knn", "cluster"} & set(protocols):
        parts = [Shard(f, i, lab[i].long()).to(inputs.device)
                 for (i, f), lab in zip(shards, inputs.labels, strict=True)]  # fmt: skip
    probe, samples = None, 0
    if {"linear", "lowshot"} & set(protocols):
        probe, samples = probe_sets(shards, inputs.labels, inputs.options, comm)
    return EncoderFeatures(encoder, parts, probe, samples)


def run_protocol(protocol: str, features: EncoderFeatures, inputs: EvalInputs) -> dict[str, Any]:
    """One protocol's flat metrics on one encoder's features (every rank calls it in step)."""
    comm, labels = inputs.comm, inputs.labels
    if protocol == "knn":
        num_classes = int(torch.cat(labels).max()) + 1
        return sharded_knn_scores(features.parts[0], features.parts[1], num_classes, comm)
    if protocol == "cluster":
        sizes = [len(lab) for lab in labels]
        num_clusters = int(torch.cat(labels).unique().numel())
        scores = sharded_kmeans_scores(features.parts, sizes, num_clusters, comm,
                                       inputs.options.seed)  # fmt: skip
        return {f"kmeans_{k}": v for k, v in scores.items()}
    if protocol in ("linear", "lowshot"):
        return probe_protocol(protocol, features, inputs.options, comm)
    if protocol == "linear_reference":  # data-parallel over the ranks
        return reference_linear(features.encoder, inputs.splits[0], inputs.views[1], labels,
                                inputs.data, inputs.options, inputs.device, comm)  # fmt: skip
    raise ValueError(f"unknown protocol {protocol!r}")


def probe_sets(
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    labels: list[torch.Tensor],
    options: EvalConfig,
    comm: Comm,
) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]] | None, int]:
    """The probes' [training sample, queries] features and labels on rank 0 (None elsewhere),
    and the sample's size.

    Each rank sends only its rows of a seeded sample of at most ``eval.probe_max_samples``
    training images, and the query split; the size is reported as ``probe_train_samples``.
    """
    sample = probe_sample(len(labels[0]), options.probe_max_samples, options.seed)
    train = gather_rows(*shards[0], sample, comm)
    queries = gather_by_index(*shards[1], len(labels[1]), comm)
    if train is None or queries is None:
        return None, int(sample.numel())
    return ([train, queries], [labels[0][sample].long(), labels[1].long()]), int(sample.numel())


def probe_protocol(
    protocol: str, features: EncoderFeatures, options: EvalConfig, comm: Comm
) -> dict[str, Any]:
    """The linear probe or the low-shot SVMs, fitted on rank 0 on the bounded sample ({} on the
    other ranks, which wait at a barrier meanwhile)."""
    row: dict[str, Any] = {}
    if features.probe is not None:  # rank 0
        with comm.idle_host_threads():  # the other ranks wait at the barrier below
            row = gathered_protocols(*features.probe, [protocol], options)
        row["probe_train_samples"] = features.probe_samples
    comm.barrier()
    return row


def split_labels(splits: list[Any], data: DataConfig) -> list[torch.Tensor]:
    """The labels of (gallery, queries); a clear error when the label column is missing."""
    label_sets = [labels_of(ds, data) for ds in splits]
    if label_sets[0] is None or label_sets[1] is None:
        raise UserError(
            f"evaluation needs labels: {data.label_column!r} is not a column of {data.source!r}"
        )
    return [lab for lab in label_sets if lab is not None]


def reference_linear(
    encoder: torch.nn.Module,
    train_split: Any,
    query_view: IndexedImages,
    labels: list[torch.Tensor],
    data: DataConfig,
    options: EvalConfig,
    device: torch.device,
    comm: Comm,
) -> dict[str, Any]:
    """The reference's linear protocol: a classifier trained through augmented images."""
    augmented = IndexedImages(train_split, data.image_column, linear_train_transform(data))
    epochs = options.linear_epochs
    schedule = ReferenceSchedule(
        epochs=epochs, milestones=(round(0.6 * epochs), round(0.8 * epochs))
    )
    res = linear_reference(
        encoder, augmented, labels[0], query_view, labels[1], schedule, device, options.seed, comm
    )
    return {f"linear_reference_{k}": v for k, v in res.items()}


def prototype_scores(
    run_dir: Path, train_labels: torch.Tensor, split: str
) -> dict[str, float | str]:
    """NMI/AMI/ARI and purity (K > classes) or accuracy of the run's own prototype assignments,
    per granularity (rank 0, after the other ranks have returned: nobody waits for it)."""
    scores: dict[str, float | str] = {}
    for m, assign in enumerate(prototype_assignments(run_dir)):
        if len(assign) != len(train_labels):
            raise UserError(
                f"the run's cluster result covers {len(assign)} images but split {split!r} has "
                f"{len(train_labels)}: pass the split (and data.max_samples) the run trained on"
            )
        for key, value in prototype_scores_of(train_labels.numpy(), assign).items():
            scores[f"k{m}_{key}"] = value
    return scores


def linear_train_transform(data: DataConfig) -> Any:
    """RandomResizedCrop + horizontal flip, the reference's linear-evaluation augmentation."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(data.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )


def probe_sample(n: int, limit: int, seed: int) -> torch.Tensor:
    """Ascending training indices the probes fit on: all, or a seeded sample of ``limit``."""
    if not limit or n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def applicable(requested: list[str], train_labels: torch.Tensor) -> list[str]:
    """The protocols that apply: multi-label (N, C) targets get the low-shot protocol only."""
    if train_labels.ndim == 2:
        return [p for p in requested if p == "lowshot"]
    return list(requested)


def gathered_protocols(
    feats: list[torch.Tensor], labels: list[torch.Tensor], protocols: list[str], options: EvalConfig
) -> dict[str, Any]:
    """The linear probe and low-shot SVMs on [gallery/train, query/test] features (rank 0).

    Labels are (N,) class ids, or (N, C) multi-label targets (1 positive, -1 negative,
    0 difficult), for which only the low-shot protocol (mAP) applies.
    """
    (xtr, xte), (ytr, yte) = feats, labels
    row: dict[str, Any] = {}
    if "linear" in protocols:
        res = linear_probe(xtr, ytr, xte, yte, seed=options.seed)
        row.update({f"linear_{k}": v for k, v in res.items()})
    if "lowshot" in protocols:
        fewest = int((ytr == 1).sum(0).min() if ytr.ndim == 2 else torch.bincount(ytr).min())
        ks = [k for k in options.lowshot_ks if k <= fewest]
        if len(ks) < len(options.lowshot_ks):
            row["lowshot_skipped_k"] = [k for k in options.lowshot_ks if k > fewest]
        runs, seed = options.lowshot_runs, options.seed
        for one in lowshot_svm(
            xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), ks, runs, seed=seed
        ):
            row[f"lowshot_k{one.k}_mean"], row[f"lowshot_k{one.k}_std"] = one.mean, one.std
    return row


def ordered_row(requested: list[str], applied: list[str], done: dict[str, Any]) -> dict[str, Any]:
    """One flat row in protocol order (knn, linear, lowshot, cluster, linear_reference)."""
    row: dict[str, Any] = {}
    skipped = [p for p in requested if p not in applied]
    if skipped:
        row["skipped_for_multilabel"] = skipped
    for prefix in ("knn", "linear_", "lowshot_", "kmeans_", "linear_reference_", "probe_"):
        for key, value in done.items():
            reference = key.startswith("linear_reference_") and prefix == "linear_"
            if key.startswith(prefix) and not reference:
                row.setdefault(key, value)
    return row
