"""Shuffled BatchNorm: bytes each rank sends per step, all_to_all exchange against all-gather.

    python benchmarks/shuffle_exchange.py [--local-batch 32] [--image-size 224] [--json OUT]

At W = 2 and 4 the key step runs on W gloo processes, through a communicator that counts the
bytes leaving its rank (an all-gather of T bytes sends T to each of the W - 1 others, as a ring
all-gather does; an all_to_all sends each part to its rank). "before" is the exchange the
trainer shipped before: every rank's float32 key images to every rank, then the keys gathered
twice (unshuffle, queue). "now" is :func:`pcl_scale.engine.keys.shuffled_keys`: uint8 images,
only to the rank that encodes them, keys gathered once. At W = 8 and 128 the same counts come
from :func:`plan_shuffle`, the function the exchange itself sends by, with no processes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.keys import plan_shuffle, shuffled_keys

DIM = 128


class CountingComm(Comm):
    """:class:`Comm` that adds up the bytes this rank sends to the others."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = {"images": 0.0, "keys": 0.0}

    def count(self, t: Tensor, nbytes: float) -> None:
        self.sent["images" if t.dim() == 4 else "keys"] += nbytes

    def all_gather_cat(self, t: Tensor) -> Tensor:
        self.count(t, (self.world_size - 1) * t.numel() * t.element_size())
        return super().all_gather_cat(t)

    def all_to_all_uneven(
        self, t: Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> Tensor:
        row = t[0].numel() * t.element_size() if len(t) else 0
        self.count(t, (sum(send_counts) - send_counts[self.rank]) * row)
        return super().all_to_all_uneven(t, send_counts, recv_counts)


def encode(images: Tensor) -> Tensor:
    """A stand-in key encoder: channel means through a fixed projection (B, DIM)."""
    proj = torch.ones(images.shape[1], DIM) / images.shape[1]
    return images.float().mean(dim=(2, 3)) @ proj


def before(comm: CountingComm, images: Tensor, gen: torch.Generator) -> Tensor:
    """The all-gather shuffle: every image everywhere, keys gathered for unshuffle and queue."""
    b = images.shape[0]
    every = comm.all_gather_cat(images)
    perm = torch.randperm(every.shape[0], generator=gen)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    keys = comm.all_gather_cat(encode(every[perm[mine]]))
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return comm.all_gather_cat(unshuffled[mine])  # the queue's gather


def rank_main(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = CountingComm()
    s, b = args.image_size, args.local_batch
    uint8 = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    sent = {}
    for name, step in (
        ("before", lambda g: before(comm, uint8.float(), g)),  # float32 views, as shipped then
        ("now", lambda g: shuffled_keys(encode, uint8, comm, g).gathered),
    ):
        comm.sent = {"images": 0.0, "keys": 0.0}
        for i in range(args.steps):
            step(torch.Generator().manual_seed(i))
        sent.update({f"{name}_{k}": v / args.steps for k, v in comm.sent.items()})
    if rank == 0:
        Path(out).write_text(json.dumps(sent))
    dist.destroy_process_group()


def planned(world: int, args: argparse.Namespace) -> dict[str, float]:
    """Rank 0's mean bytes per step from the plans alone (the same counts the exchange sends)."""
    b, image = args.local_batch, 3 * args.image_size**2
    keys = (world - 1) * b * DIM * 4  # the one gather of float32 keys
    images = 0.0
    for i in range(args.steps):
        perm = torch.randperm(world * b, generator=torch.Generator().manual_seed(i))
        images += plan_shuffle(perm, b, 0, world).images_sent * image  # uint8
    return {
        "before_images": (world - 1) * b * image * 4,  # float32 views to every other rank
        "before_keys": 2 * keys,
        "now_images": images / args.steps,
        "now_keys": keys,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--planned", type=int, nargs="+", default=[2, 4, 8, 128])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    report: dict[str, Any] = {"measured": {}, "planned": {}}
    for world in args.worlds:
        out = f"/tmp/shuffle_exchange_{os.getpid()}_{world}.json"
        mp.spawn(rank_main, args=(world, args, 29650 + world, out), nprocs=world, join=True)
        report["measured"][world] = json.loads(Path(out).read_text())
        os.unlink(out)
    for world in args.planned:
        report["planned"][world] = planned(world, args)
    mb = 1e6
    print(f"bytes sent per rank per step, local batch {args.local_batch}, {args.image_size} px")
    print("| W | source | images before (all-gather, float32) | images now (all_to_all, uint8) "
          "| keys before (2 gathers) | keys now (1 gather) | total now / before |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for source in ("measured", "planned"):
        for world, r in report[source].items():
            total = (r["now_images"] + r["now_keys"]) / (r["before_images"] + r["before_keys"])
            print(
                f"| {world} | {source} | {r['before_images'] / mb:.2f} MB "
                f"| {r['now_images'] / mb:.2f} MB | {r['before_keys'] / mb:.3f} MB "
                f"| {r['now_keys'] / mb:.3f} MB | x{total:.4f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
