import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score as nmi

import pcl_scale.core.kmeans as kmeans_module
from pcl_scale.core.clusters import cluster_features
from pcl_scale.core.kmeans import (
    KMeansOptions,
    _update_centroids,
    assign,
    faiss_available,
    kmeans,
    restart_seed,
)
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.estep import ClusteringPlan, cluster_sharded

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="needs faiss (faiss-cpu)")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


def blobs(n=3000, k=12, d=16, spread=0.02, seed=0):
    """Well-separated clusters of unit vectors: (points, labels)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.arange(n) % k
    x = centers[labels] + spread * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1), labels


def matched_centroid_error(a, b):
    cost = torch.cdist(a, b).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spherical", [False, True])
def test_recovers_blobs(backend, spherical):
    x, labels = blobs()
    res = kmeans(x, 12, niter=20, spherical=spherical, seed=0, backend=backend, init="kmeans++")
    assert res.centroids.shape == (12, 16)
    assert res.assignments.shape == (3000,) and res.assignments.dtype == torch.long
    assert res.distances.shape == (3000,) and res.distances.dtype == torch.float32
    assert nmi(labels.numpy(), res.assignments.numpy()) >= 0.99
    if spherical:
        torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(12))


@needs_faiss
@pytest.mark.parametrize("init", ["random", "kmeans++"])
@pytest.mark.parametrize("spherical", [False, True])
def test_backends_agree(init, spherical):
    """Same seeded initialisation, so both backends run the same Lloyd iterations."""
    x, _ = blobs(seed=1, spread=0.3)
    a = kmeans(x, 12, niter=20, nredo=2, seed=0, backend="torch", init=init, spherical=spherical)
    b = kmeans(x, 12, niter=20, nredo=2, seed=0, backend="faiss", init=init, spherical=spherical)
    assert nmi(a.assignments.numpy(), b.assignments.numpy()) >= 0.999
    assert matched_centroid_error(a.centroids, b.centroids) < 1e-4
    assert a.objective == pytest.approx(b.objective, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_init_picks_distinct_seeded_rows(backend):
    """niter=0 returns the initialisation: k distinct rows of x chosen by the seed."""
    x, _ = blobs(n=300, k=5, d=4, seed=7, spread=0.5)
    a = kmeans(x, 5, niter=0, seed=3, backend=backend)
    b = kmeans(x, 5, niter=0, seed=4, backend=backend)
    is_row = (a.centroids[:, None, :] == x[None, :, :]).all(dim=2)  # (K, N)
    assert bool(is_row.any(dim=1).all())
    assert a.centroids.unique(dim=0).shape[0] == 5
    assert not torch.equal(a.centroids, b.centroids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_is_self_consistent(backend):
    """Assignments are the nearest final centroid and distances are squared L2 to it."""
    x, _ = blobs(n=500, k=7, seed=2, spread=0.3)
    res = kmeans(x, 7, niter=5, seed=3, backend=backend)
    d2 = torch.cdist(x.double(), res.centroids.double()) ** 2  # (N, K) slow reference
    torch.testing.assert_close(res.assignments, d2.argmin(dim=1))
    torch.testing.assert_close(res.distances.double(), d2.min(dim=1).values, atol=1e-5, rtol=1e-4)
    assert res.objective == pytest.approx(float(res.distances.double().sum()), rel=1e-6)


def test_chunked_equals_unchunked():
    x, _ = blobs(n=1000, k=30, d=8, spread=0.5, seed=3)
    whole = kmeans(x, 30, niter=10, seed=5, chunk_bytes=1 << 30)
    tiny = kmeans(x, 30, niter=10, seed=5, chunk_bytes=4 * 30 * 7)  # 7 rows per chunk
    torch.testing.assert_close(whole.centroids, tiny.centroids)
    assert torch.equal(whole.assignments, tiny.assignments)
    torch.testing.assert_close(whole.distances, tiny.distances)


def test_assign_chunk_never_exceeds_budget(monkeypatch):
    x = torch.randn(1000, 4)
    c = torch.randn(50, 4)
    sizes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    assign(x, c, chunk_bytes=4 * 50 * 64)
    assert max(sizes) <= 50 * 64 and len(sizes) == 16


def test_seeded_and_restarts_keep_the_best():
    x, _ = blobs(n=800, k=20, d=8, spread=0.6, seed=4)
    a = kmeans(x, 20, niter=10, seed=11)
    b = kmeans(x, 20, niter=10, seed=11)
    assert torch.equal(a.assignments, b.assignments)
    singles = [kmeans(x, 20, niter=10, seed=restart_seed(11, i)).objective for i in range(4)]
    best = kmeans(x, 20, niter=10, nredo=4, seed=11)
    assert best.objective == pytest.approx(min(singles))


def test_kmeans_plusplus_recovers_blobs():
    x, labels = blobs(seed=5)
    res = kmeans(x, 12, niter=10, seed=0, init="kmeans++")
    assert nmi(labels.numpy(), res.assignments.numpy()) >= 0.99


def test_max_points_per_centroid_subsamples_training_only():
    x, labels = blobs(n=3000, seed=6)
    res = kmeans(x, 12, niter=20, seed=0, init="kmeans++", max_points_per_centroid=40)
    assert res.assignments.shape == (3000,)
    assert nmi(labels.numpy(), res.assignments.numpy()) >= 0.99


def test_empty_cluster_policies():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    sums = torch.tensor([[2.0, 0.2], [0.0, 10.0], [0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([2.0, 10.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    kept = _update_centroids(old, sums, counts, False, "keep", g)
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.1], [0.0, 1.0], [5.0, 5.0]]))
    split = _update_centroids(old, sums, counts, False, "reseed", g)
    # the empty cluster and a donor become mirror perturbations of the donor's mean
    donor = 0 if not torch.allclose(split[0], torch.tensor([1.0, 0.1])) else 1
    mean = torch.tensor([[1.0, 0.1], [0.0, 1.0]])[donor]
    torch.testing.assert_close((split[2] + split[donor]) / 2, mean)
    assert not torch.equal(split[2], split[donor])
    assert torch.dist(split[2], mean) < 1e-2


def test_reseed_leaves_no_empty_cluster_on_duplicates():
    # half the points coincide, so random init picks duplicate centroids and some start empty
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(500, 4), torch.randn(500, 4, generator=g)])
    res = kmeans(x, 40, niter=15, seed=0, empty="reseed")
    counts = torch.bincount(res.assignments, minlength=40)
    kept = kmeans(x, 40, niter=15, seed=0, empty="keep")
    assert int((counts == 0).sum()) < int(
        (torch.bincount(kept.assignments, minlength=40) == 0).sum()
    )
    assert res.objective <= kept.objective


@pytest.mark.parametrize(("k", "message"), [(0, "k=0"), (11, "k=11 clusters from N=10")])
def test_bad_k(k, message):
    with pytest.raises(ValueError, match=message):
        kmeans(torch.randn(10, 3), k)


def test_faiss_rejects_torch_only_options():
    with pytest.raises(ValueError, match="empty='keep'"):
        kmeans(torch.randn(10, 3), 2, backend="faiss", empty="keep")


def overlapping_blobs(n=4000, k=16, d=8, seed=0):
    """Clusters whose spread is comparable to their distance: many points near a boundary."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g)
    return centers[torch.randint(k, (n,), generator=g)] + 0.9 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("k", [16, 40])
def test_objective_within_one_percent_of_scikit_learn_from_the_same_init(k):
    from sklearn.cluster import KMeans

    x = overlapping_blobs()
    init = kmeans(x, k, niter=0, seed=3).centroids  # niter=0 returns the initialisation
    ours = kmeans(x, k, niter=25, seed=3, empty="keep")
    ref = KMeans(k, init=init.double().numpy(), n_init=1, max_iter=25, tol=0.0, algorithm="lloyd")
    ref.fit(x.double().numpy())
    assert ours.objective == pytest.approx(float(ref.inertia_), rel=0.01)


def row_ids(rows: torch.Tensor, x: torch.Tensor) -> set[int]:
    """Which rows of ``x`` (exactly) make up ``rows``."""
    match = (rows[:, None, :] == x[None, :, :]).all(-1)  # (K, N)
    assert bool(match.any(1).all())
    return set(match.float().argmax(1).tolist())


def assert_no_shared_inits(inits: list[set[int]]) -> None:
    """No initialisation reuses most of another's rows (random ones share about K'/N of them)."""
    for i, a in enumerate(inits):
        for b in inits[:i]:
            shared = len(a & b) / min(len(a), len(b))
            assert shared < 0.6, f"two inits share {shared:.0%} of their rows"


def test_no_two_granularity_restarts_share_an_init(monkeypatch):
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))  # distinct rows
    inits = []
    real = kmeans_module._initial_centroids

    def recording(train, k, init, spherical, gen):
        out = real(train, k, init, spherical, gen)
        inits.append(row_ids(out, x))
        return out

    monkeypatch.setattr(kmeans_module, "_initial_centroids", recording)
    cluster_features(x, (100, 200, 300), 0.2, KMeansOptions(niter=0, nredo=5, seed=0))
    assert len(inits) == 15
    assert_no_shared_inits(inits)


def test_no_two_granularity_restarts_share_an_init_sharded(monkeypatch):
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    inits = []
    real = kmeans_module.fetch_rows

    def recording(x_local, index_local, wanted, all_reduce_sum):
        inits.append(set(wanted.tolist()))
        return real(x_local, index_local, wanted, all_reduce_sum)

    monkeypatch.setattr(kmeans_module, "fetch_rows", recording)
    plan = ClusteringPlan((100, 200, 300), 0.2, KMeansOptions(niter=0, nredo=5, seed=0), "sharded")
    cluster_sharded(torch.arange(1000), x, 1000, Comm(), plan)
    assert len(inits) == 15
    assert_no_shared_inits(inits)


@pytest.mark.parametrize(
    "device, installed, gpus, expected",
    [
        ("cuda", True, 0, "torch"),  # faiss-cpu on a GPU host: the GPU would idle
        ("cuda", True, 8, "faiss"),
        ("cuda", False, 0, "torch"),
        ("cpu", True, 0, "faiss"),
        ("cpu", False, 0, "torch"),
    ],
)
def test_auto_backend_never_leaves_a_gpu_idle(monkeypatch, device, installed, gpus, expected):
    monkeypatch.setattr(kmeans_module, "faiss_available", lambda: installed)
    monkeypatch.setattr(kmeans_module, "faiss_gpu_count", lambda: gpus if installed else 0)
    backend, reason = kmeans_module.resolve_backend("auto", torch.device(device))
    assert backend == expected and reason
    assert kmeans_module.resolve_backend("torch", torch.device(device))[0] == "torch"
