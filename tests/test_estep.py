"""E-step modes: 2 gloo processes against 1 process on the same features and seeds."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pcl_scale.core.clusters import ClusterResult, cluster_features
from pcl_scale.core.kmeans import KMeansOptions, faiss_available
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.estep import (
    ClusteringPlan,
    broadcast_clusters,
    choose_mode,
    cluster_sharded,
)
from pcl_scale.distributed.extract import ExtractOptions, gather_by_index

from .fakes import FakeComm

KMEANS = KMeansOptions(niter=10, nredo=2, spherical=False, seed=3, init="random", backend="torch")


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
        sharded = cluster_sharded(index, local, n, comm, ClusteringPlan(tuple(ks), 0.2, KMEANS))
        gathered_full = gather_by_index(index, local, n, comm)
        result = (
            cluster_features(gathered_full, ks, 0.2, KMEANS) if gathered_full is not None else None
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
    single = cluster_features(features(n), ks, 0.2, KMEANS)
    for mode in ("sharded", "gather"):
        r0, r1 = results[mode]
        assert_same(r0, r1, atol=0.0)  # identical on both ranks
        assert_same(r0, single)  # and equal to the single-process E-step
    assert_same(results["sharded"][0], results["gather"][0])


def test_choose_mode_rule():
    gib, cpu, cuda = 2**30, torch.device("cpu"), torch.device("cuda", 0)

    def mode(*args):
        return choose_mode(*args)[0]

    assert mode("auto", 10**9, 128, 1, "faiss", cuda, 8 * gib) == "gather"  # one process
    assert mode("auto", 1_281_167, 128, 8, "faiss", cpu, 8 * gib) == "gather"
    assert mode("auto", 1_281_167, 128, 8, "torch", cpu, 8 * gib) == "sharded"
    assert mode("auto", 1_281_167, 128, 8, "faiss", cuda, 8 * gib) == "sharded"  # GPUs shard
    assert mode("auto", 14_000_000 * 2, 128, 64, "faiss", cpu, 8 * gib) == "sharded"  # too big
    assert mode("sharded", 10, 128, 1, "faiss", cpu, 8 * gib) == "sharded"
    assert "over the budget" in choose_mode("auto", 10**8, 128, 8, "faiss", cpu, gib)[1]


class _Points(torch.utils.data.Dataset):
    """Rows of ``features(n)`` as (1, 1, D) "images" with their index; the embedding flattens."""

    def __init__(self, n: int) -> None:
        self.x = features(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i][None, None], i


def _threads_worker(rank: int, init_file: str, out_dir: str) -> None:
    import pcl_scale.distributed.estep as estep

    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # as torchrun and accelerate launch set it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen: list[int] = []
    clustered = estep.cluster_features

    def recording(*args: Any, **kwargs: Any) -> ClusterResult:
        seen.append(torch.get_num_threads())
        return clustered(*args, **kwargs)

    estep.cluster_features = recording
    try:
        opts = ExtractOptions(batch_size=64, num_workers=0, device=torch.device("cpu"))
        plan = ClusteringPlan((7,), 0.2, KMeansOptions(niter=5), mode="gather")
        result = estep.run_estep(lambda x: x.flatten(1), _Points(301), Comm(), opts, plan)
        save_file(result.state_dict(), f"{out_dir}/threads_{rank}.safetensors")
        Path(out_dir, f"threads_{rank}.txt").write_text(f"{seen} {torch.get_num_threads()}")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable CPUs")
def test_gather_mode_clusters_with_the_waiting_ranks_threads(tmp_path):
    """Rank 0 clusters with both processes' threads, only while the other rank waits."""
    mp.spawn(_threads_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "threads_0.txt").read_text() == "[2] 1"  # two during k-means, then one
    assert (tmp_path / "threads_1.txt").read_text() == "[] 1"  # rank 1 does not cluster
    r0, r1 = (
        ClusterResult.from_state_dict(load_file(str(tmp_path / f"threads_{r}.safetensors")))
        for r in (0, 1)
    )
    assert_same(r0, r1, atol=0.0)
    assert_same(r0, cluster_features(features(301), [7], 0.2, KMeansOptions(niter=5)))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_idle_host_threads_rule(monkeypatch, one_thread):
    with Comm().idle_host_threads() as threads:  # one process: nobody waits
        assert threads == torch.get_num_threads() == 1
    comm = FakeComm(rank=0, world_size=4, cpus=8)  # a group of 4, two of them on this host
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    faiss = sys.modules.get("faiss") if faiss_available() else None
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    with comm.idle_host_threads() as threads:
        assert threads == torch.get_num_threads() == 2
        if faiss is not None:
            assert faiss.omp_get_max_threads() == 2
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    capped = FakeComm(rank=0, world_size=8, cpus=3)  # capped by the usable CPUs
    with pytest.raises(RuntimeError, match="boom"), capped.idle_host_threads() as threads:
        assert threads == torch.get_num_threads() == 3
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 1  # restored after an error too
    for junk in ("", "two", "-2", "0"):  # not a launcher's count: borrow nothing
        monkeypatch.setenv("LOCAL_WORLD_SIZE", junk)
        with comm.idle_host_threads() as threads:
            assert threads == torch.get_num_threads() == 1
    if faiss is not None:
        assert faiss.omp_get_max_threads() == faiss_before


def test_estep_on_duplicated_data_gives_finite_phi_and_loss():
    """Every image repeated: clusters of exact duplicates have distance sums of 0."""
    from pcl_scale.core.loss import PCLLoss
    from pcl_scale.distributed.estep import run_estep

    class Repeated(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = features(40, seed=5).repeat(8, 1)  # (320, 8): 40 points, 8 copies each

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.x[i][None, None], i

    opts = ExtractOptions(batch_size=64, num_workers=0, device=torch.device("cpu"))
    for mode in ("gather", "sharded"):
        plan = ClusteringPlan((40, 30), 0.2, KMeansOptions(niter=10, nredo=2), mode)
        result = run_estep(lambda x: x.flatten(1), Repeated(), Comm(), opts, plan)
        for c in result.clusterings:
            assert bool(torch.isfinite(c.phi).all()) and float(c.phi.min()) > 0, mode
        q = F.normalize(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        queue = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1)
        out = PCLLoss(0.2, 4)(q, q, queue, torch.arange(8) * 40, result,
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
        assert torch.isfinite(out.loss), mode


def test_fixed_concentration_sets_every_phi_to_the_temperature_and_keeps_the_clusters():
    """The phi ablation changes phi only: same prototypes and assignments as the estimate."""
    from pcl_scale.distributed.estep import estep

    opts = ExtractOptions(batch_size=64, num_workers=0, device=torch.device("cpu"))
    for mode in ("gather", "sharded"):
        estimated = ClusteringPlan((9, 5), 0.3, KMEANS, mode)
        fixed = ClusteringPlan((9, 5), 0.3, KMEANS, mode, fixed_concentration=True)
        a = estep(lambda x: x.flatten(1), _Points(200), Comm(), opts, estimated)
        b = estep(lambda x: x.flatten(1), _Points(200), Comm(), opts, fixed)
        for ca, cb in zip(a.clusters.clusterings, b.clusters.clusterings, strict=True):
            assert float(ca.phi.std()) > 0, mode  # the estimate differs between clusters
            assert torch.equal(cb.phi, torch.full_like(ca.phi, 0.3)), mode
            assert torch.equal(ca.prototypes, cb.prototypes), mode
            assert torch.equal(ca.assignments, cb.assignments), mode
        assert b.record["k0_phi_min"] == pytest.approx(0.3), mode


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (5, 4), (7, 1), (8, 2)])
def test_all_gather_by_index_places_every_strided_shard(n, world):
    from pcl_scale.distributed.extract import all_gather_by_index

    from .fakes import run_ranks

    def rank_main(comm):
        mine = torch.arange(comm.rank, n, world)
        return all_gather_by_index(mine, (mine * 10).int(), n, comm)

    for out in run_ranks(world, rank_main):
        assert out.dtype == torch.int32 and torch.equal(out, (torch.arange(n) * 10).int())

    def wrong_shard(comm):  # rank 1 holds rank 0's rows: refused on that rank
        mine = torch.arange(0, n, world)
        if comm.rank == 1:
            with pytest.raises(RuntimeError, match="coverage check failed on rank 1"):
                all_gather_by_index(mine, mine.int(), n, comm)
            return None
        return None

    if world == 2:
        run_ranks(world, wrong_shard)


def test_gather_rows_assembles_a_sample_on_rank_0_only():
    from pcl_scale.distributed.extract import gather_rows

    from .fakes import run_ranks

    x = features(50)
    wanted = torch.tensor([0, 3, 4, 17, 31, 49])

    def rank_main(comm):
        mine = torch.arange(comm.rank, 50, 3)
        return gather_rows(mine, x[mine], wanted, comm)

    out = run_ranks(3, rank_main)
    assert out[1] is None and out[2] is None
    assert torch.equal(out[0], x[wanted])
