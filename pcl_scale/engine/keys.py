"""Keys of the momentum encoder: shuffled BatchNorm across ranks, and the initial queue fill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pcl_scale.config import Config
from pcl_scale.core.model import PCLModel
from pcl_scale.data import DeviceInput, IndexedImages, seed_worker
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.seeding import SeedStream, derive_seed


@dataclass(frozen=True)
class ShufflePlan:
    """One rank's part of a shuffled-BatchNorm exchange: what it sends where, and how the images
    it receives are put in the order of its shuffled batch.

    Slot ``j`` of the global shuffled batch holds global image ``perm[j]``; rank ``r`` encodes
    slots ``[r B, (r + 1) B)``. Image ``g`` lives on rank ``g // B``.
    """

    rank: int
    send_order: Tensor  # (B,) local image indices, grouped by destination rank
    send_counts: list[int]  # images to each rank (this rank's own included)
    recv_counts: list[int]  # images from each rank
    arrange: Tensor  # (B,) received image i goes to slot arrange[i] of this rank's batch

    @property
    def images_sent(self) -> int:
        """Images that leave this rank (those it keeps for itself travel nowhere)."""
        return int(self.send_order.numel()) - self.send_counts[self.rank]


def plan_shuffle(perm: Tensor, local_batch: int, rank: int, world_size: int) -> ShufflePlan:
    """Rank ``rank``'s :class:`ShufflePlan` for the slot permutation ``perm`` (W B,)."""
    b = local_batch
    source = perm // b  # (W B,) the rank holding each slot's image
    destination = torch.arange(perm.numel()) // b
    mine = (source == rank).nonzero().squeeze(1)  # ascending slots: grouped by destination
    my_slots_source = source[rank * b : (rank + 1) * b]
    return ShufflePlan(
        rank=rank,
        send_order=perm[mine] - rank * b,
        send_counts=torch.bincount(destination[mine], minlength=world_size).tolist(),
        recv_counts=torch.bincount(my_slots_source, minlength=world_size).tolist(),
        arrange=torch.argsort(my_slots_source, stable=True),
    )


@dataclass(frozen=True)
class ShuffledKeys:
    """The keys of this rank's images, and those of the whole global batch in rank order."""

    local: Tensor  # (B, D)
    gathered: Tensor  # (W B, D): what the queue takes


def shuffled_keys(
    encode: Callable[[Tensor], Tensor], im_k: Tensor, comm: Comm, gen: torch.Generator
) -> ShuffledKeys:
    """Keys with shuffled BatchNorm (MoCo): each rank encodes a random slice of the global batch.

    Only the images a rank encodes travel to it (one all_to_all: B images sent and received per
    rank, whatever W), and the keys are gathered once, for the unshuffle and the queue alike.
    The permutation comes from a generator seeded identically on every rank, so no broadcast is
    needed; the batches, and so the keys, are those of gathering every image everywhere. On one
    process this is the plain key forward. Shape: (B, C, H, W) -> (B, D) and (W B, D).
    """
    if comm.world_size == 1:
        keys = encode(im_k)
        return ShuffledKeys(keys, keys)
    b = im_k.shape[0]
    perm = torch.randperm(b * comm.world_size, generator=gen)
    plan = plan_shuffle(perm, b, comm.rank, comm.world_size)
    received = comm.all_to_all_uneven(
        im_k[plan.send_order.to(im_k.device)], plan.send_counts, plan.recv_counts
    )
    batch = torch.empty_like(received)
    batch[plan.arrange.to(im_k.device)] = received  # slot order: the gathered batch's perm[mine]
    keys = comm.all_gather_cat(encode(batch).contiguous())  # (W B, D), shuffled order
    unshuffled = torch.empty_like(keys)
    unshuffled[perm.to(keys.device)] = keys
    return ShuffledKeys(unshuffled[comm.rank * b : (comm.rank + 1) * b], unshuffled)


def fill_queue(
    cfg: Config,
    inner: PCLModel,
    view: IndexedImages,
    comm: Comm,
    local_batch: int,
    autocast: Callable[[], Any],
    to_input: DeviceInput,
) -> None:
    """Fill the whole queue with keys of real training images before the first step.

    Random unit vectors (the reference's start) are nearly orthogonal to every query, which lets
    an untrained encoder collapse onto its common component (docs/algorithm.md). The key encoder
    embeds a seeded random draw of key views, shuffled BatchNorm as in training, the same draw on
    every rank; the gathered keys fill the queue and the pointer ends at 0.

    ``view`` yields ``(key view, index)`` for ``(round, index)`` keys: one augmentation per
    image and round over the dataset, not the training pair.
    """
    seed = cfg.run.seed
    size = inner.queue.shape[0]
    global_batch = local_batch * comm.world_size
    batches = -(-size // global_batch)
    g = torch.Generator().manual_seed(derive_seed(seed, SeedStream.QUEUE_FILL, 0, 0, 0))
    rounds = -(-batches * global_batch // len(view))  # a queue longer than the dataset repeats it
    order = torch.cat([torch.randperm(len(view), generator=g) for _ in range(rounds)])
    keyed = torch.stack([torch.arange(order.numel()) // len(view), order], dim=1)  # (round, idx)
    mine = keyed[: batches * global_batch].view(batches, comm.world_size, local_batch, 2)
    loader = DataLoader(
        view,
        batch_size=local_batch,
        sampler=[(r, i) for r, i in mine[:, comm.rank].reshape(-1, 2).tolist()],  # O(queue) keys
        num_workers=cfg.data.num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(
            derive_seed(seed, SeedStream.QUEUE_FILL, 0, 1, comm.rank)
        ),
    )
    device = to_input.device
    keys = []
    with torch.no_grad(), autocast():
        for step, (im_k, _) in enumerate(loader):
            gen = torch.Generator().manual_seed(
                derive_seed(seed, SeedStream.QUEUE_FILL, 1, step, 0)
            )
            im_k = im_k.to(device, non_blocking=True)
            augment = torch.Generator(device=device).manual_seed(
                derive_seed(seed, SeedStream.QUEUE_FILL, 2, step, comm.rank)
            )  # the device-side photometric augmentations, if any
            encode = lambda images, g=augment: inner.embed(to_input(images, g))  # noqa: E731
            keys.append(shuffled_keys(encode, im_k, comm, gen).gathered.float())
    inner.queue_ptr.zero_()
    inner.enqueue(torch.cat(keys)[:size])  # a full turn: the pointer is back at 0
