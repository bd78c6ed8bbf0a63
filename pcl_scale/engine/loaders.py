"""The training split and its per-epoch loaders: order and augmentations follow (seed, epoch)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

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


class EpochOrder(Sampler[int]):
    """This rank's share of one epoch's shuffled order, held as an int32 tensor.

    The same order as ``DistributedSampler(shuffle=True, drop_last=True)`` at ``seed + epoch``
    (resumes of earlier runs continue), without its list of N Python ints on every rank (3.6 GB
    at 100M images); ``skip`` drops the first samples of the share (a mid-epoch resume).
    """

    def __init__(self, n: int, world_size: int, rank: int, seed: int, skip: int = 0) -> None:
        total = (n // world_size) * world_size
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.indices = perm[rank:total:world_size][skip:].to(torch.int32)  # (about N / W,)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __iter__(self) -> Iterator[int]:
        for chunk in self.indices.split(1 << 16):
            yield from chunk.tolist()


def make_loader(
    cfg: Config, view: IndexedImages, comm: Comm, local_batch: int, epoch: int, skip: int = 0
) -> DataLoader:
    """This rank's shuffled loader for one epoch; order and augmentations follow (seed, epoch).

    ``skip`` micro-batches are dropped from the front (a mid-epoch resume): the order of the rest
    is unchanged, and the RNG state restored from the checkpoint continues the augmentations.
    """
    if skip == 0:  # augmentations drawn in the main process (data.num_workers=0)
        seed_everything(derive_seed(cfg.run.seed, SeedStream.AUGMENT, epoch, 0, comm.rank))
    order = EpochOrder(
        len(view), comm.world_size, comm.rank, cfg.run.seed + epoch, skip * local_batch
    )
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
