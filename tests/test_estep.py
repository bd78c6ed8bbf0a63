"""E-step modes: 2 gloo processes against 1 process on the same features and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pcl_scale.clusters import ClusterResult, cluster_features
from pcl_scale.distributed import Comm
from pcl_scale.estep import (
    broadcast_clusters,
    choose_mode,
    cluster_sharded,
    gather_by_index,
)

KW: dict[str, Any] = {
    "niter": 10,
    "nredo": 2,
    "spherical": False,
    "seed": 3,
    "init": "random",
    "backend": "torch",
}


def features(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(12, d, generator=g), dim=1)
    x = centres[torch.randint(12, (n,), generator=g)] + 0.4 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


def _worker(rank: int, world: int, init_file: str, out_dir: str, n: int, ks: list[int]) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comm = Comm()
        full = features(n)
        index = torch.arange(rank, n, world)
        local = full[index]
        sharded = cluster_sharded(index, local, n, comm, ks, 0.2, KW)
        gathered_full = gather_by_index(index, local, n, comm)
        result = (
            cluster_features(gathered_full, ks, 0.2, **KW) if gathered_full is not None else None
        )
        gathered = broadcast_clusters(result, ks, n, full.shape[1], comm)
        save_file(sharded.state_dict(), f"{out_dir}/sharded_{rank}.safetensors")
        save_file(gathered.state_dict(), f"{out_dir}/gather_{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path: Path, n: int, ks: list[int]) -> dict[str, list[ClusterResult]]:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), n, ks), nprocs=2, join=True)
    return {
        mode: [
            ClusterResult.from_state_dict(load_file(str(tmp_path / f"{mode}_{r}.safetensors")))
            for r in (0, 1)
        ]
        for mode in ("sharded", "gather")
    }


def assert_same(a: ClusterResult, b: ClusterResult, atol: float = 1e-5) -> None:
    for ca, cb in zip(a.clusterings, b.clusterings, strict=True):
        assert torch.equal(ca.assignments.long(), cb.assignments.long())
        torch.testing.assert_close(ca.prototypes, cb.prototypes, atol=atol, rtol=0)
        torch.testing.assert_close(ca.phi, cb.phi, atol=atol, rtol=1e-5)


@pytest.mark.dist
@pytest.mark.parametrize(("n", "ks"), [(1001, [5, 40]), (61, [40])])
def test_two_processes_match_one_process_in_both_modes(tmp_path, n, ks):
    """N odd (uneven shards); with N = 61 each rank holds ~30 rows, fewer than K = 40."""
    results = run_two_processes(tmp_path, n, ks)
    single = cluster_features(features(n), ks, 0.2, **KW)
    for mode in ("sharded", "gather"):
        r0, r1 = results[mode]
        assert_same(r0, r1, atol=0.0)  # identical on both ranks
        assert_same(r0, single)  # and equal to the single-process E-step
    assert_same(results["sharded"][0], results["gather"][0])


def test_choose_mode_rule():
    gib = 2**30
    assert choose_mode("auto", 10**9, 128, 1, True, 8 * gib) == "gather"
    assert choose_mode("auto", 1_281_167, 128, 8, True, 8 * gib) == "gather"
    assert choose_mode("auto", 1_281_167, 128, 8, False, 8 * gib) == "sharded"
    assert choose_mode("auto", 14_000_000 * 2, 128, 64, True, 8 * gib) == "sharded"
    assert choose_mode("sharded", 10, 128, 1, True, 8 * gib) == "sharded"
