"""The training split and its per-epoch loaders: order and augmentations follow (seed, epoch)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pcl_scale.config import Config
from pcl_scale.data import IndexedImages, seed_worker, undecodable_indices
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.seeding import SeedStream, derive_seed, seed_everything
from pcl_scale.errors import DataError


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
    if skip == 0:  # augmentations drawn in the main process (data.num_workers=0)
        seed_everything(derive_seed(cfg.run.seed, SeedStream.AUGMENT, epoch, 0, comm.rank))
    order = list(sampler)[skip * local_batch :]
    return DataLoader(
        view,
        batch_size=local_batch,
        sampler=order,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(
            derive_seed(cfg.run.seed, SeedStream.LOADER, epoch, skip, comm.rank)
        ),
        persistent_workers=False,
    )
