"""Shuffled BatchNorm on a real process group: the all_to_all exchange against gathering every
image everywhere, with a BatchNorm encoder, the same seeds.

    torchrun --nproc_per_node 2 tests/scripts/shuffle_check.py OUT_DIR

Each rank writes its keys from both exchanges and the bytes each one moved.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pcl_scale.distributed.comm import Comm, init_from_env
from pcl_scale.engine.keys import shuffled_keys


def gather_everything_keys(encode, im_k, comm, gen):
    """Every rank receives every rank's images, encodes its slice of the permutation."""
    b = im_k.shape[0]
    all_k = comm.all_gather_cat(im_k)
    perm = torch.randperm(all_k.shape[0], generator=gen)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    keys = comm.all_gather_cat(encode(all_k[perm[mine]]).contiguous())
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return unshuffled[mine], comm.all_gather_cat(unshuffled[mine])


def main() -> None:
    out = Path(sys.argv[1])
    init_from_env()
    comm = Comm()
    torch.manual_seed(0)  # the same encoder on every rank
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)
    )
    images = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(100 + comm.rank))
    result = {}
    with torch.no_grad():
        encoder(images)  # materialise the lazy layer before any comparison
        for step in range(3):
            new = shuffled_keys(encoder, images, comm, torch.Generator().manual_seed(step))
            local, gathered = gather_everything_keys(
                encoder, images, comm, torch.Generator().manual_seed(step)
            )
            result[f"step{step}"] = {
                "local_equal": bool(torch.equal(new.local, local)),
                "gathered_equal": bool(torch.equal(new.gathered, gathered)),
                "differs_from_local_forward": not torch.allclose(new.local, encoder(images)),
            }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()  # no gloo thread may outlive the interpreter (abort at exit)


if __name__ == "__main__":
    main()
