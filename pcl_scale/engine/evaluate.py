"""Evaluation inside a training run: the final learned-vs-raw table and the kNN monitor.

Features are extracted sharded like the E-step (:mod:`pcl_scale.distributed.extract`) and
scored on rank 0 with :mod:`pcl_scale.evaluation.metrics`, with the threads of the waiting ranks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from pcl_scale.artifacts import EMBEDDINGS_FILE
from pcl_scale.config import Config
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import ExtractOptions, extract_all
from pcl_scale.engine.runtime import sync_buffers, unwrap
from pcl_scale.evaluation.metrics import knn_scores, representation_scores

# The raw-pixel baseline is computed only when all eval images fit in this many float values.
RAW_BASELINE_MAX_VALUES = 400_000_000


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
    inner = unwrap(accelerator, model)
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
