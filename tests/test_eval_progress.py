"""Evaluation that shows progress and does not waste time: k-means stops at a fixed point with the
result of all its iterations; row-chunked passes keep the bits; the end-of-run evaluation says
what it extracts and which score runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pcl_scale.core.kmeans as kmeans_module
from pcl_scale.config import load_config
from pcl_scale.core.kmeans import (
    KMeansOptions,
    kmeans,
    kmeans_plusplus,
    kmeans_sharded,
    row_sq_norms,
)
from pcl_scale.distributed.comm import Comm

from .conftest import tiny_overrides
from .fakes import run_ranks


def mixture(n: int = 1200, k: int = 6, d: int = 16, spread: float = 1.5, seed: int = 0):
    """Overlapping clusters: Lloyd needs several iterations, then settles well before 100."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    noise = spread / d**0.5 * torch.randn(n, d, generator=g)
    return F.normalize(centres[torch.randint(k, (n,), generator=g)] + noise, dim=1)


def slow_lloyd(
    x: torch.Tensor, init: torch.Tensor, niter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``niter`` iterations of plain Lloyd in float64 (no cluster empties on this data)."""
    c = init.double()
    xd = x.double()
    for _ in range(niter):
        a = torch.cdist(xd, c).argmin(1)
        c = torch.stack([xd[a == j].mean(0) for j in range(c.shape[0])])
    return c.float(), torch.cdist(xd, c).argmin(1)


def never_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmeans_module, "_fixed_point", lambda stats, empty: False)


def test_kmeans_stops_early_with_the_slow_full_runs_result(monkeypatch):
    x = mixture()
    assign_passes = []
    real = torch.addmm

    def counting(*args, **kwargs):
        assign_passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", counting)
    res = kmeans(x, 6, niter=100, seed=3, init="kmeans++")
    # every Lloyd iteration and the final assignment are one addmm each (one chunk): far fewer
    # than the 101 that 100 iterations take
    assert len(assign_passes) < 40
    init = kmeans(x, 6, niter=0, seed=3, init="kmeans++").centroids
    centroids, assignments = slow_lloyd(x, init, 100)
    assert torch.equal(res.assignments, assignments)
    torch.testing.assert_close(res.centroids, centroids, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("empty", ["reseed", "keep"])
def test_early_stop_is_bit_identical_to_running_every_iteration(monkeypatch, spherical, empty):
    # a quarter of the points coincide: random init starts several clusters on the same point,
    # so clusters empty on the way (re-seeded, or kept empty to the end)
    x = torch.cat([torch.zeros(100, 4), mixture(n=300, k=8, d=4, spread=2.0, seed=1)])
    args = dict(niter=60, nredo=3, seed=5, init="random", spherical=spherical, empty=empty)
    splits = []
    real_split = kmeans_module._split_large_clusters

    def counting_split(*a):
        splits.append(1)
        return real_split(*a)

    monkeypatch.setattr(kmeans_module, "_split_large_clusters", counting_split)
    early = kmeans(x, 40, **args)
    assert early.iterations < 60
    if empty == "reseed":
        assert splits  # the stop waited for the re-seeded clusters to settle
    else:
        assert (torch.bincount(early.assignments, minlength=40) == 0).any()
    never_fixed(monkeypatch)
    full = kmeans(x, 40, **args)
    assert full.iterations == 60
    assert torch.equal(early.centroids, full.centroids)
    assert torch.equal(early.assignments, full.assignments)
    assert torch.equal(early.distances, full.distances)
    assert early.objective == full.objective


def test_sharded_early_stop_agrees_over_ranks_and_with_one_process(monkeypatch):
    x = mixture(n=900, k=5, d=8, seed=2)
    options = KMeansOptions(niter=100, nredo=2, seed=1, init="kmeans++")
    one = kmeans_sharded(x, torch.arange(900), 900, 5, lambda t: t, options)
    assert one.iterations < 100

    def rank_main(comm):
        index = torch.arange(comm.rank, 900, comm.world_size)
        return kmeans_sharded(x[index], index, 900, 5, comm.all_reduce_sum, options)

    ranks = run_ranks(3, rank_main)
    assert {r.iterations for r in ranks} == {one.iterations}  # every rank stops at once
    for r in ranks:
        torch.testing.assert_close(r.centroids, one.centroids, atol=1e-6, rtol=1e-6)
        assert r.objective == pytest.approx(one.objective, rel=1e-6)
    never_fixed(monkeypatch)
    full = kmeans_sharded(x, torch.arange(900), 900, 5, lambda t: t, options)
    assert torch.equal(full.centroids, one.centroids) and full.objective == one.objective


@pytest.mark.parametrize("n, d", [(1, 7), (513, 33), (4099, 64)])
def test_row_chunked_passes_give_the_bits_of_the_whole_matrix(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g)
    for chunk_bytes in (4 * d, 4 * d * 64, 1 << 30):  # one row, 64 rows, everything
        assert torch.equal(row_sq_norms(x, chunk_bytes), x.pow(2).sum(1))
    # k-means++ draws the same rows as the unchunked formula written out here
    k = min(n, 9)
    gen = torch.Generator().manual_seed(7)
    got = kmeans_plusplus(x, k, gen, chunk_bytes=4 * d * 64)
    gen = torch.Generator().manual_seed(7)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = (x - x[chosen[0]]).pow(2).sum(1)
    for _ in range(1, k):
        weights = closest.clamp_min(0).double()
        if float(weights.sum()) <= 0.0:
            weights = torch.ones(n, dtype=torch.float64)
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        closest = torch.minimum(closest, (x - x[chosen[-1]]).pow(2).sum(1))
    assert torch.equal(got, x[chosen])


def test_end_of_run_evaluation_names_what_it_extracts_and_scores(tiny_dataset_dir, tmp_path, capfd):
    from accelerate.state import AcceleratorState, GradientState

    from pcl_scale.engine.loop import train

    extra = {"optim.epochs": 1, "run.evaluate": "true", "data.eval_split": "test"}
    cfg = load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "run", **extra))
    try:
        result = train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert result.evaluation is not None
    err = capfd.readouterr().err
    for line in (
        "[final eval] extract train (48 images) through the backbone ...",
        "[final eval] extract test (",
        "as raw pixels: done in",
        "[final eval] cluster (k-means, K = 4) on raw pixels ...",
        "[final eval] knn (k = 5) on raw pixels ...",
        "[final eval] cluster (k-means, K = 4) on pcl backbone ...",
        "[final eval] knn (k = 5) on pcl backbone: done in",
    ):
        assert line in err, err[-2000:]
    first = err.index("extract train")
    assert first < err.index("cluster (k-means") < err.index("knn (k = 5) on pcl backbone")


def test_progress_lines_come_from_rank_0_only(capfd):
    from pcl_scale.evaluation.progress import Progress

    def rank_main(comm):
        Progress(comm.is_main).line(f"rank {comm.rank} here")

    run_ranks(2, rank_main)
    err = capfd.readouterr().err
    assert "rank 0 here" in err and "rank 1 here" not in err
    Progress(Comm().is_main).line("one process")
    assert "[eval] one process" in capfd.readouterr().err
