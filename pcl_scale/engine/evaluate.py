"""Evaluation inside a training run: the final learned-vs-raw table and the kNN monitor.

Features are extracted sharded like the E-step and stay on their ranks: kNN and k-means scores
run sharded (:mod:`pcl_scale.evaluation.sharded`), so no rank works alone on N rows while the
others wait, and every rank ends with the same scores. The final evaluation says on rank 0's
stderr what it extracts (a tqdm bar on a terminal) and names each score as it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pcl_scale.artifacts import EMBEDDINGS_FILE
from pcl_scale.config import Config
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import ExtractOptions, gather_rows
from pcl_scale.engine.runtime import sync_buffers, unwrap
from pcl_scale.evaluation.progress import Progress
from pcl_scale.evaluation.sharded import (
    Shard,
    concat_splits,
    sharded_kmeans_scores,
    sharded_knn_scores,
)

# The raw-pixel baseline is computed only when all eval images fit in this many float values.
RAW_BASELINE_MAX_VALUES = 400_000_000
EMBEDDING_SAMPLE = 10_000  # features kept for the run report's map


@dataclass(frozen=True)
class Splits:
    """This rank's shards of each split (gallery first), for the learned and the raw features."""

    learned: list[Shard]
    raw: list[Shard]
    sizes: list[int]
    num_classes: int  # largest label + 1 (kNN votes)
    num_clusters: int  # distinct labels (K of the k-means scores)


def evaluate(
    cfg: Config, accelerator: Any, model: Any, comm: Comm, extract: ExtractOptions, train_ds: Any
) -> dict[str, dict[str, float]] | None:
    """kNN (k=5, cosine) and k-means NMI/AMI of the backbone features vs raw pixels.

    The kNN gallery is the training split and the queries are ``data.eval_split``; k-means runs
    on the union. Without an eval split only k-means on the training split is reported. Raw
    pixels are the same eval view, flattened (skipped when too large to hold).
    """
    splits = [train_ds] + (
        [load_split(cfg.data, cfg.data.eval_split)] if cfg.data.eval_split else []
    )
    pixels = 3 * cfg.data.image_size**2
    with_raw = pixels * sum(len(ds) for ds in splits) <= RAW_BASELINE_MAX_VALUES
    progress = Progress(comm.is_main, "final eval")
    shards = labelled_shards(cfg, accelerator, model, comm, extract, splits, with_raw, progress)
    report = {
        name: representation_scores(feats, shards, comm, cfg.run.seed, progress, name)
        for name, feats in (("raw pixels", shards.raw), ("pcl backbone", shards.learned))
        if feats
    }
    save_embedding_sample(
        Path(cfg.run.output_dir), shards.learned, shards.sizes, comm, cfg.run.seed
    )
    return report


def representation_scores(
    feats: list[Shard],
    splits: Splits,
    comm: Comm,
    seed: int,
    progress: Progress | None = None,
    name: str = "features",
) -> dict[str, float]:
    """k-means NMI/AMI/ARI/ACC on all splits together; kNN (k = 5) top-1 with two splits."""
    progress = progress or Progress(False)
    with progress.stage(f"cluster (k-means, K = {splits.num_clusters}) on {name}"):
        row = sharded_kmeans_scores(feats, splits.sizes, splits.num_clusters, comm, seed)
    if len(feats) > 1:
        with progress.stage(f"knn (k = 5) on {name}"):
            knn = sharded_knn_scores(feats[0], feats[1], splits.num_classes, comm,
                                     votes=(("knn5", 5, None),))  # fmt: skip
        row["knn_top1"] = knn["knn5_top1"]
    return row


def save_embedding_sample(
    run_dir: Path, shards: list[Shard], sizes: list[int], comm: Comm, seed: int
) -> None:
    """A seeded random sample of the final backbone features with labels, for the run report.

    Each rank sends only its rows of the sample to rank 0, which writes it.
    """
    joined = concat_splits(shards, sizes)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(sum(sizes), generator=g)[:EMBEDDING_SAMPLE].sort().values
    rows = torch.cat([joined.feats.cpu(), joined.labels.float().cpu()[:, None]], dim=1)  # (n, F+1)
    sample = gather_rows(joined.index.cpu(), rows, keep, comm)
    if sample is not None:  # rank 0
        features, labels = sample[:, :-1].contiguous(), sample[:, -1].round().long()
        save_file({"features": features, "labels": labels}, str(run_dir / EMBEDDINGS_FILE))


def monitor_knn(
    cfg: Config, accelerator: Any, model: Any, comm: Comm, extract: ExtractOptions, train_ds: Any
) -> dict[str, float] | None:
    """kNN of the online backbone during training (None when unlabelled or without eval split).

    The gallery is the training split, the queries ``data.eval_split``; both through the
    deterministic eval view, extracted and scored sharded. It leaves torch's RNG as it found it
    (its loaders draw their seeds from it), so the check never changes the training run, and a
    stop during it (:class:`StopRequestedError`) leaves the RNG where the epoch ended.
    """
    if not (cfg.data.label_column and cfg.data.eval_split):
        return None
    with torch.random.fork_rng(devices=[]):
        splits = [train_ds, load_split(cfg.data, cfg.data.eval_split)]
        shards = labelled_shards(cfg, accelerator, model, comm, extract, splits, False)
        gallery, queries = shards.learned
        return sharded_knn_scores(gallery, queries, shards.num_classes, comm)


def labelled_shards(
    cfg: Config,
    accelerator: Any,
    model: Any,
    comm: Comm,
    extract: ExtractOptions,
    splits: list[Any],
    with_raw: bool,
    progress: Progress | None = None,
) -> Splits:
    """This rank's online-backbone features (and raw pixels) of each split, with labels.

    Rank 0's BatchNorm statistics are made everyone's first, so every shard comes from the same
    encoder. ``progress``: what to say while extracting (nothing by default).
    """
    inner = unwrap(accelerator, model)
    sync_buffers(inner, comm)
    inner.eval()
    try:
        learned, raw, labels = extract_labelled(cfg, inner.encoder_q.backbone, comm, extract,
                                                splits, with_raw, progress)  # fmt: skip
    finally:  # also when a stop ends the extraction
        inner.train()
    every = torch.cat(labels)
    sizes = [len(ds) for ds in splits]
    return Splits(learned, raw, sizes, int(every.max()) + 1, int(every.unique().numel()))


def extract_labelled(
    cfg: Config,
    backbone: torch.nn.Module,
    comm: Comm,
    extract: ExtractOptions,
    splits: list[Any],
    with_raw: bool,
    progress: Progress | None = None,
) -> tuple[list[Shard], list[Shard], list[torch.Tensor]]:
    """Per split: this rank's backbone features (and raw pixels) as shards on the device (the
    scores run there), and all labels (host)."""
    progress = progress or Progress(False)
    names = [cfg.data.split, cfg.data.eval_split][: len(splits)]
    learned: list[Shard] = []
    raw: list[Shard] = []
    all_labels = []
    for split, ds in zip(names, splits, strict=True):
        view = IndexedImages(ds, cfg.data.image_column, eval_transform(cfg.data))
        labels = labels_of(ds, cfg.data)
        assert labels is not None
        what = f"extract {split} ({len(ds)} images)"
        index, feats = progress.extract(
            backbone, view, comm, extract, f"{what} through the backbone"
        )
        learned.append(Shard(feats, index, labels[index].long()).to(extract.device))
        if with_raw:
            _, pixels = progress.extract(torch.nn.Flatten(), view, comm, extract,
                                         f"{what} as raw pixels")  # fmt: skip
            raw.append(Shard(pixels, index, labels[index].long()).to(extract.device))
        all_labels.append(labels)
    return learned, raw, all_labels
