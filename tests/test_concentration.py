import math

import numpy as np
import pytest
import torch

from pcl_scale.core.concentration import (
    cluster_distance_stats,
    concentration,
    concentration_from_stats,
)


def slow_reference_phi(sq_dist, assign, k, temperature, alpha=10.0):
    """The reference's per-sample Python loop, written out with numpy."""
    members: list[list[float]] = [[] for _ in range(k)]
    for d, a in zip(sq_dist.tolist(), assign.tolist(), strict=True):
        members[a].append(d)
    density = np.zeros(k)
    for i, dist in enumerate(members):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + alpha)
    dmax = density.max()
    for i, dist in enumerate(members):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


def test_hand_made_clusters():
    # cluster 0: distances 1, 3 (count 2); cluster 1: distances 2, 2, 2, 2 (count 4);
    # cluster 2: a singleton; cluster 3: empty.
    dist = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 2.0, 5.0])
    assign = torch.tensor([0, 0, 1, 1, 1, 1, 2])
    dist_sum, count = cluster_distance_stats(dist**2, assign, 4)
    assert dist_sum.tolist() == pytest.approx([4.0, 8.0, 5.0, 0.0])
    assert count.tolist() == [2, 4, 1, 0]
    raw = [2.0 / math.log(12.0), 2.0 / math.log(14.0)]
    raw += [max(raw), max(raw)]  # singleton and empty get the max
    lo, hi = np.percentile(raw, 10), np.percentile(raw, 90)
    clipped = np.clip(raw, lo, hi)
    expected = 0.2 * clipped / clipped.mean()
    phi = concentration_from_stats(dist_sum, count, temperature=0.2)
    assert phi.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert phi.mean().item() == pytest.approx(0.2, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 2000, 57
    assign = torch.randint(k - 5, (n,), generator=g)  # leaves some clusters empty
    assign[:3] = k - 1  # one cluster with 3 members
    assign[3] = k - 2  # a singleton
    sq_dist = torch.rand(n, generator=g, dtype=torch.float64) * 2
    phi = concentration(sq_dist, assign, k, temperature=0.2)
    ref = slow_reference_phi(sq_dist.numpy(), assign.numpy(), k, 0.2)
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-5)


def test_clip_and_rescale_invariants():
    g = torch.Generator().manual_seed(3)
    n, k = 5000, 100
    assign = torch.randint(k, (n,), generator=g)
    sq_dist = torch.rand(n, generator=g) ** 4
    phi = concentration(sq_dist, assign, k, temperature=0.1)
    assert phi.mean().item() == pytest.approx(0.1, rel=1e-5)
    # after the clip, at least 10% of the entries sit on each bound
    assert (phi == phi.min()).sum() >= k // 10
    assert (phi == phi.max()).sum() >= k // 10


def test_stats_are_additive_over_shards():
    g = torch.Generator().manual_seed(4)
    n, k = 1000, 20
    assign = torch.randint(k, (n,), generator=g)
    sq = torch.rand(n, generator=g)
    full = cluster_distance_stats(sq, assign, k)
    a = cluster_distance_stats(sq[:300], assign[:300], k)
    b = cluster_distance_stats(sq[300:], assign[300:], k)
    torch.testing.assert_close(full[0], a[0] + b[0])
    torch.testing.assert_close(full[1], a[1] + b[1])


def test_all_singletons_give_temperature():
    phi = concentration(torch.ones(3), torch.tensor([0, 1, 2]), 4, temperature=0.3)
    assert phi.tolist() == pytest.approx([0.3] * 4)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        concentration(torch.ones(3), torch.tensor([0, 0, 1]), 2, temperature=0.0)


def test_clusters_of_exact_duplicates_get_a_positive_phi():
    """Distance sums of 0 (duplicates-only clusters) must not make c / phi infinite."""
    count = torch.full((10,), 5.0, dtype=torch.float64)
    spread = torch.linspace(1.0, 2.0, 10, dtype=torch.float64)
    for zeros in (2, 6, 9):  # p10 is 0 from 2 of 10 on; a majority; all but one
        dist_sum = spread.clone()
        dist_sum[:zeros] = 0.0
        phi = concentration_from_stats(dist_sum, count, temperature=0.2)
        assert bool(torch.isfinite(phi).all()) and float(phi.min()) > 0, zeros
        assert phi.mean().item() == pytest.approx(0.2, rel=1e-5)
        assert float(phi[:zeros].max()) <= float(phi[zeros:].min())  # still the tightest


def test_all_clusters_of_duplicates_give_temperature():
    count = torch.full((6,), 4.0, dtype=torch.float64)
    phi = concentration_from_stats(torch.zeros(6, dtype=torch.float64), count, temperature=0.2)
    assert phi.tolist() == pytest.approx([0.2] * 6)


def test_floor_leaves_ordinary_clusters_alone():
    g = torch.Generator().manual_seed(0)
    assign = torch.randint(40, (3000,), generator=g)
    sq_dist = torch.rand(3000, generator=g, dtype=torch.float64) * 2
    phi = concentration(sq_dist, assign, 40, temperature=0.2)
    ref = slow_reference_phi(sq_dist.numpy(), assign.numpy(), 40, 0.2)
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-5)
