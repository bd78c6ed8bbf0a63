"""Keys of the momentum encoder: shuffled BatchNorm across ranks, and the initial queue fill."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pcl_scale.config import Config
from pcl_scale.core.model import PCLModel
from pcl_scale.data import IndexedImages, seed_worker
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.seeding import SeedStream, derive_seed


def shuffled_keys(
    encode: Callable[[Tensor], Tensor], im_k: Tensor, comm: Comm, gen: torch.Generator
) -> Tensor:
    """Keys with shuffled BatchNorm (MoCo): each rank encodes a random slice of the global batch.

    The permutation comes from a generator seeded identically on every rank, so no broadcast is
    needed. On one process this is the plain key forward. Shape: (B, C, H, W) -> (B, D).
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


def fill_queue(
    cfg: Config,
    inner: PCLModel,
    view: IndexedImages,
    comm: Comm,
    local_batch: int,
    autocast: Callable[[], Any],
) -> None:
    """Fill the whole queue with keys of real training images before the first step.

    Random unit vectors (the reference's start) are nearly orthogonal to every query, which lets
    an untrained encoder collapse onto its common component (docs/algorithm.md). The key encoder
    embeds a seeded random draw of key views, shuffled BatchNorm as in training, the same draw on
    every rank; the gathered keys fill the queue and the pointer ends at 0.

    ``view`` yields ``(key view, index)``: one augmentation per image, not the training pair.
    """
    seed = cfg.run.seed
    size = inner.queue.shape[0]
    global_batch = local_batch * comm.world_size
    batches = -(-size // global_batch)
    g = torch.Generator().manual_seed(derive_seed(seed, SeedStream.QUEUE_FILL, 0, 0, 0))
    rounds = -(-batches * global_batch // len(view))  # a queue longer than the dataset repeats it
    order = torch.cat([torch.randperm(len(view), generator=g) for _ in range(rounds)])
    mine = order[: batches * global_batch].view(batches, comm.world_size, local_batch)[:, comm.rank]
    loader = DataLoader(
        view,
        batch_size=local_batch,
        sampler=mine.flatten().tolist(),
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(
            derive_seed(seed, SeedStream.QUEUE_FILL, 0, 1, comm.rank)
        ),
    )
    device = inner.queue.device
    keys = []
    with torch.no_grad(), autocast():
        for step, (im_k, _) in enumerate(loader):
            gen = torch.Generator().manual_seed(
                derive_seed(seed, SeedStream.QUEUE_FILL, 1, step, 0)
            )
            k = shuffled_keys(inner.embed, im_k.to(device), comm, gen)
            keys.append(comm.all_gather_cat(k.float()))  # (global batch, D)
    inner.queue_ptr.zero_()
    inner.enqueue(torch.cat(keys)[:size])  # a full turn: the pointer is back at 0
