"""Shuffled BatchNorm with world > 1, through the fake communicator (ranks as threads)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pcl_scale.engine.keys import plan_shuffle, shuffled_keys

from .conftest import ROOT, launch_env
from .fakes import run_ranks


def images_of(rank: int, b: int = 4) -> torch.Tensor:
    """(B, C, H, W) images of one rank, distinct across ranks."""
    return torch.randn(b, 3, 2, 2, generator=torch.Generator().manual_seed(100 + rank)).double()


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_the_keys_of_its_own_images(world):
    """With a per-sample encoder the shuffle must be invisible: keys = encode(own images)."""
    weight = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)).double()
    encoded: list[list[torch.Tensor]] = [[] for _ in range(world)]

    def rank_main(comm):
        def encode(x):
            encoded[comm.rank].append(x.clone())
            return x.flatten(1) @ weight  # (B, 5)

        im = images_of(comm.rank)
        return im, shuffled_keys(encode, im, comm, torch.Generator().manual_seed(7)).local

    results = run_ranks(world, rank_main)
    for im, keys in results:
        torch.testing.assert_close(keys, im.flatten(1) @ weight, rtol=0, atol=1e-12)
    # every image was encoded exactly once, and the batches were mixed across ranks
    everything = torch.cat([im for im, _ in results]).flatten(1)
    batches = [torch.cat(e).flatten(1) for e in encoded]
    all_encoded = torch.cat(batches)
    assert all_encoded.shape == everything.shape
    match = (all_encoded[:, None, :] == everything[None, :, :]).all(-1)  # (W B, W B)
    assert bool((match.sum(0) == 1).all()) and bool((match.sum(1) == 1).all())
    own = [bool((batches[r][:, None] == results[r][0].flatten(1)[None]).all(-1).any(1).all())
           for r in range(world)]  # fmt: skip
    assert not all(own), "no rank encoded another rank's image: nothing was shuffled"


def test_batch_statistics_follow_the_shuffled_batch():
    """A BatchNorm-like encoder sees the shuffled batch: keys differ from the local forward."""

    def centre(x):
        return (x - x.mean(0, keepdim=True)).flatten(1)

    def rank_main(comm):
        im = images_of(comm.rank)
        return centre(im), shuffled_keys(centre, im, comm, torch.Generator().manual_seed(7)).local

    for local, shuffled in run_ranks(2, rank_main):
        assert not torch.allclose(local, shuffled)


def test_one_process_is_the_plain_forward():
    def rank_main(comm):
        im = images_of(0)
        keys = shuffled_keys(lambda x: x * 2, im, comm, torch.Generator())
        return torch.equal(keys.local, im * 2) and torch.equal(keys.gathered, im * 2)

    assert run_ranks(1, rank_main) == [True]


def gather_everything_keys(encode, im_k, comm, gen):
    """The all-gather shuffle (every rank receives every image): the slow reference."""
    b = im_k.shape[0]
    all_k = comm.all_gather_cat(im_k)
    perm = torch.randperm(all_k.shape[0], generator=gen)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    keys = comm.all_gather_cat(encode(all_k[perm[mine]]).contiguous())
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return unshuffled[mine], comm.all_gather_cat(unshuffled[mine])


def batchnorm_like(x):
    """Depends on the whole batch and on its order only through the batch statistics."""
    return ((x - x.mean(0, keepdim=True)) / (x.std(0, keepdim=True) + 1e-3)).flatten(1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_keys_equal_the_gather_everything_shuffle(world):
    """Same seed, same keys (bit for bit) as all-gathering every image; gathered keys = the
    queue's all-gather of the local keys."""

    def rank_main(comm):
        im = images_of(comm.rank, b=6)
        new = shuffled_keys(batchnorm_like, im, comm, torch.Generator().manual_seed(11))
        ref_local, ref_gathered = gather_everything_keys(
            batchnorm_like, im, comm, torch.Generator().manual_seed(11)
        )
        return new, ref_local, ref_gathered

    for new, ref_local, ref_gathered in run_ranks(world, rank_main):
        assert torch.equal(new.local, ref_local)
        assert torch.equal(new.gathered, ref_gathered)


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_each_rank_sends_and_receives_one_batch(world):
    """The plans move every image once: B images in and at most B out per rank, whatever W."""
    b = 8
    perm = torch.randperm(world * b, generator=torch.Generator().manual_seed(world))
    plans = [plan_shuffle(perm, b, r, world) for r in range(world)]
    for r, plan in enumerate(plans):
        assert sum(plan.recv_counts) == b and sum(plan.send_counts) == b
        assert [p.send_counts[r] for p in plans] == plan.recv_counts  # the counts pair up
        assert sorted(plan.send_order.tolist()) == list(range(b))
        assert plan.images_sent <= b


def test_two_gloo_processes_get_the_gather_everything_keys(tmp_path):
    """The all_to_all exchange on a real gloo group: keys bit-identical to the reference."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", str(ROOT / "tests" / "scripts" / "shuffle_check.py"),
        str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        for step in json.loads((tmp_path / f"rank{rank}.json").read_text()).values():
            assert step == {
                "local_equal": True, "gathered_equal": True, "differs_from_local_forward": True
            }  # fmt: skip
