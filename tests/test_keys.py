"""Shuffled BatchNorm with world > 1, through the fake communicator (ranks as threads)."""

from __future__ import annotations

import pytest
import torch

from pcl_scale.engine.keys import shuffled_keys

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
        return im, shuffled_keys(encode, im, comm, torch.Generator().manual_seed(7))

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
        return centre(im), shuffled_keys(centre, im, comm, torch.Generator().manual_seed(7))

    for local, shuffled in run_ranks(2, rank_main):
        assert not torch.allclose(local, shuffled)


def test_one_process_is_the_plain_forward():
    def rank_main(comm):
        im = images_of(0)
        return torch.equal(shuffled_keys(lambda x: x * 2, im, comm, torch.Generator()), im * 2)

    assert run_ranks(1, rank_main) == [True]
