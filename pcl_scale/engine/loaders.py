"""The training split and its per-epoch loaders: order and augmentations follow (seed, epoch)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from pcl_scale.config import Config
from pcl_scale.data import IndexedImages, SampleKey, seed_worker, undecodable_indices
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.seeding import SeedStream, derive_seed
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


class EpochOrder(Sampler[SampleKey]):
    """This rank's share of one epoch's shuffled order, held as an int32 tensor.

    The same order as ``DistributedSampler(shuffle=True, drop_last=True)`` at ``seed + epoch``
    (resumes of earlier runs continue), without its list of N Python ints on every rank (3.6 GB
    at 100M images). It yields ``(epoch, index)`` keys, so each sample's augmentations are seeded
    by (run seed, epoch, index). :meth:`set_epoch` moves it to another epoch, ``skip`` dropping the
    first samples of the share (a mid-epoch resume): one loader serves every epoch.
    """

    def __init__(self, n: int, world_size: int, rank: int, seed: int) -> None:
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        total = (self.n // self.world_size) * self.world_size
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        self.epoch = epoch
        self.indices = perm[self.rank : total : self.world_size][skip:].to(torch.int32)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        for chunk in self.indices.split(1 << 16):
            for index in chunk.tolist():
                yield epoch, index


def loader_options(cfg: Config, device: torch.device) -> dict[str, Any]:
    """DataLoader settings every phase shares: workers kept alive across epochs and phases'
    repeats, their prefetch depth, and pinned batches on CUDA (asynchronous copies)."""
    options: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if cfg.data.num_workers:
        options.update(
            persistent_workers=True,
            prefetch_factor=cfg.data.prefetch_factor,
            worker_init_fn=seed_worker,
        )
    return options


def augmented_view(cfg: Config, ds: Any, transform: Any, stream: SeedStream) -> IndexedImages:
    """A view whose samples are augmented from seeds of (run seed, ``stream``, epoch, index)."""
    return IndexedImages(ds, cfg.data.image_column, transform, (cfg.run.seed, int(stream)))


class EpochLoader:
    """This rank's shuffled loader for every epoch; order and augmentations follow (seed, epoch).

    One DataLoader (and one set of persistent workers) for the whole run; :meth:`epoch` points its
    sampler at an epoch. A mid-epoch resume skips the micro-batches already trained on: the order
    of the rest and their augmentations (seeded per sample) are unchanged.
    """

    def __init__(
        self, cfg: Config, view: IndexedImages, comm: Comm, local_batch: int, device: torch.device
    ) -> None:
        self.local_batch = local_batch
        self.order = EpochOrder(len(view), comm.world_size, comm.rank, cfg.run.seed)
        self.loader = DataLoader(
            view,
            batch_size=local_batch,
            sampler=self.order,
            num_workers=cfg.data.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(
                derive_seed(cfg.run.seed, SeedStream.LOADER, 0, 0, comm.rank)
            ),
            **loader_options(cfg, device),
        )

    def epoch(self, epoch: int, skip: int = 0) -> DataLoader:
        """The loader over ``epoch``'s share, without its first ``skip`` micro-batches."""
        self.order.set_epoch(epoch, skip * self.local_batch)
        return self.loader
