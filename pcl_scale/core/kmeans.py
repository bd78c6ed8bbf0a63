"""k-means behind one signature, with a built-in torch backend and a faiss backend.

Both backends run Lloyd's algorithm and return a :class:`KMeansResult` of the same form:

* ``centroids`` (K, D): the final centroids as k-means leaves them: un-normalised for Euclidean
  k-means (what the PCL reference feeds to the concentration estimate), unit-norm for spherical.
* ``assignments`` (N,) int64: nearest final centroid of every point (one assignment pass after the
  last update, as faiss' ``index.search`` does in the reference).
* ``distances`` (N,) float32: **squared** L2 distance of each point to its assigned centroid.

The torch backend never holds more than ``chunk_bytes`` of the N x K distance matrix: assignment
runs over row chunks of ``x``. ``niter`` is an upper bound: Lloyd's iterations stop at a fixed
point, an iteration in which no point changes cluster (and none is empty under ``"reseed"``),
since every later iteration would repeat it (bit for bit on a CPU): the result is the one all
``niter`` iterations give, only sooner (scikit-learn's "strict convergence"; no tolerance).
Empty clusters are handled in one of two documented ways:

* ``"reseed"`` (default, as faiss does): an empty cluster takes a slightly perturbed copy of a
  centroid of a large cluster (chosen with probability proportional to its size minus one), and the
  donor gets the mirror perturbation, so both halves split the donor's points on the next pass.
* ``"keep"`` (as DeepCluster-v2 does): an empty cluster keeps its previous centroid.

Both rules read only K-sized statistics, so they give the same result on every rank of a sharded
run where the per-cluster sums and counts are all-reduced.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.core.kmeans_faiss import (
    FaissGpus,
    faiss_available,
    faiss_gpu_count,
    faiss_gpus_for,
    faiss_lloyd_and_assign,
)
from pcl_scale.core.seeds import mix_seed

Backend = Literal["auto", "torch", "faiss"]
Init = Literal["random", "kmeans++"]
EmptyPolicy = Literal["reseed", "keep"]
Reduce = Callable[[Tensor], Tensor]

# Budget for one block of the N x K distance matrix: blocks of tens of MiB keep a CPU's caches
# busy (docs/benchmarks.md); a GPU wants larger ones, for fewer launches.
CPU_CHUNK_BYTES = 64 * 2**20
GPU_CHUNK_BYTES = 1024 * 2**20
# Scratch for row-chunked passes over the (N, D) points (norms, k-means++ distances).
PASS_CHUNK_BYTES = 2**20
_SPLIT_EPS = 1.0 / 1024.0


@dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: (K, D) float32 final centroids (unit-norm when spherical).
        assignments: (N,) int64 index of the nearest centroid of each point.
        distances: (N,) float32 squared L2 distance of each point to its centroid.
        objective: sum of ``distances`` (the k-means inertia of the kept restart).
        iterations: Lloyd iterations the kept restart ran: ``niter``, or fewer when it reached
            a fixed point (torch backend; faiss always runs ``niter``).
    """

    centroids: Tensor
    assignments: Tensor
    distances: Tensor
    objective: float
    iterations: int = 0

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """The backend to run for ``backend`` on ``device``, and why (the run logs both).

    ``auto`` never leaves a GPU idle: on CUDA it takes faiss only when faiss itself has GPUs
    (faiss-cpu on a GPU host would cluster on the CPU), else the torch backend and its fused
    kernel; on a CPU it takes faiss when it imports.
    """
    if backend != "auto":
        return backend, f"estep.backend={backend}"
    if device.type == "cuda":
        if faiss_gpu_count() > 0:
            return "faiss", "auto on CUDA: faiss has GPUs"
        return "torch", "auto on CUDA: faiss has no GPUs, the torch backend clusters on the device"
    if faiss_available():
        return "faiss", "auto on CPU: faiss is installed"
    return "torch", "auto on CPU: faiss is not installed"


# tags that keep the restart and granularity seed streams apart
_RESTART, _GRANULARITY = 1, 2


def restart_seed(seed: int, restart: int) -> int:
    """Restart 0 starts from ``seed``, restart j > 0 from a hash of (seed, j).

    With ``seed + j`` restart 1 of granularity m would start from restart 0 of granularity m + 1:
    random init draws ``randperm(N)[:K]``, so the two would share their first K rows.
    """
    return seed if restart == 0 else mix_seed(seed, _RESTART, restart)


def granularity_seed(seed: int, m: int) -> int:
    """The k-means seed of granularity m of an E-step seeded with ``seed`` (a hash of both)."""
    return mix_seed(seed, _GRANULARITY, m)


@dataclass(frozen=True)
class KMeansOptions:
    """The k-means hyperparameters of an E-step (see :func:`kmeans` for each field)."""

    niter: int = 20
    nredo: int = 1
    spherical: bool = False
    seed: int = 0
    backend: Backend = "torch"
    init: Init = "random"
    empty: EmptyPolicy = "reseed"
    faiss_gpus: tuple[int, ...] = ()


def kmeans(
    x: Tensor,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 1,
    spherical: bool = False,
    seed: int = 0,
    backend: Backend = "torch",
    init: Init = "random",
    empty: EmptyPolicy = "reseed",
    max_points_per_centroid: int | None = None,
    chunk_bytes: int | None = None,
    faiss_gpus: tuple[int, ...] = (),
    gpu_resources: FaissGpus | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters with Lloyd's algorithm.

    Objective: minimise sum_i ||x_i - c_{a(i)}||^2 over centroids c and assignments a. Spherical
    k-means re-normalises the centroids to unit norm after every update (for unit-norm ``x`` this
    maximises sum_i x_i . c_{a(i)}).

    Args:
        x: (N, D) points; any float dtype, computed in float32 on ``x.device``.
        k: number of clusters, 1 <= k <= N.
        niter: Lloyd iterations (assignment + update) per restart, at most: the torch backend
            stops at a fixed point (no assignment changed), which changes nothing in the result.
        nredo: restarts, seeded by :func:`restart_seed`; the lowest objective is kept.
        spherical: unit-normalise centroids after each update.
        seed: seed of the initialisation (and of the empty-cluster reseeding).
        backend: ``"torch"`` (built-in), ``"faiss"`` (faiss-cpu, or faiss-gpu on the GPU of
            ``x``), or ``"auto"`` (:func:`resolve_backend`).
        init: ``"random"`` (k distinct seeded rows, as faiss and the reference) or
            ``"kmeans++"`` (D^2 sampling: better minima, but K sequential passes, so meant for
            small K). Computed here for both backends, so they start from the same centroids.
        empty: ``"reseed"`` or ``"keep"`` (torch backend; faiss always re-seeds).
        max_points_per_centroid: train on a seeded sample of at most this many points per
            centroid (``None``: all points); the final assignment always covers all points.
        chunk_bytes: memory budget of one chunk of the N x K distance matrix (torch backend);
            ``None``: 64 MiB on CPU, 1 GiB on GPU.
        faiss_gpus: devices faiss-gpu clusters on (``()``: the GPU of ``x``, if any).
        gpu_resources: faiss GPU resources to reuse (an E-step makes them once for all its
            granularities); ``None``: made here, once for all restarts.

    Returns:
        A :class:`KMeansResult` on ``x.device``.
    """
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(x.device)
    _check_args(x, x.shape[0] if x.dim() else 0, k, niter, nredo, chunk_bytes)
    backend = resolve_backend(backend, x.device)[0]  # type: ignore[assignment]
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown k-means backend {backend!r}: use 'torch', 'faiss' or 'auto'")
    if backend == "faiss" and empty != "reseed":
        raise ValueError(
            f"the faiss backend always re-seeds empty clusters (got empty={empty!r}); "
            f"use backend='torch' to keep them"
        )

    x = x.detach().float()
    if backend == "faiss" and gpu_resources is None:
        gpu_resources = faiss_gpus_for(faiss_gpus, x.device)
    # (N,) ||x||^2 for the final assignment of every restart (the fused CUDA kernel needs none)
    sq_norms = row_sq_norms(x) if backend == "torch" and not _use_fused(x) else None
    best: KMeansResult | None = None
    for redo in range(nredo):
        # Both backends start from the same seeded initialisation, computed here.
        gen = torch.Generator(device="cpu").manual_seed(restart_seed(seed, redo))
        train = _training_sample(x, k, max_points_per_centroid, gen)
        centroids = _initial_centroids(train, k, init, spherical, gen)
        if backend == "faiss":
            centroids, assignments, distances = faiss_lloyd_and_assign(
                x, train, centroids, niter, spherical, gpu_resources
            )
            iterations = niter
        else:
            centroids, iterations = lloyd(train, centroids, niter, spherical, empty, gen,
                                          chunk_bytes)  # fmt: skip
            assignments, distances = assign(x, centroids, chunk_bytes, sq_norms)
        objective = float(distances.double().sum())
        result = KMeansResult(centroids, assignments, distances, objective, iterations)
        if best is None or result.objective < best.objective:
            best = result
    assert best is not None
    return best


def default_chunk_bytes(device: torch.device) -> int:
    """Distance-block budget for ``device``: small on CPU (cache), large on GPU (fewer launches)."""
    return GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES


def kmeans_sharded(
    x_local: Tensor,
    index_local: Tensor,
    n_total: int,
    k: int,
    all_reduce_sum: Reduce,
    options: KMeansOptions = KMeansOptions(),
    chunk_bytes: int | None = None,
) -> KMeansResult:
    """k-means over rows spread across processes, without moving the rows.

    Each iteration assigns the local rows against the replicated centroids (chunked) and sums the
    per-cluster sums and counts with ``all_reduce_sum``; the update (and the empty-cluster rule)
    reads only those K-sized sums and a generator seeded identically everywhere, so every process
    holds the same centroids. The initial rows are chosen by global index from ``seed`` exactly as
    :func:`kmeans` chooses them on the whole matrix, so the two give the same clustering up to
    floating-point summation order.

    Args:
        x_local: (n_local, D) this process's rows.
        index_local: (n_local,) int64 global row index of each local row (disjoint across
            processes, covering 0..n_total-1).
        n_total: N, rows over all processes.
        k: clusters.
        all_reduce_sum: sums a tensor over processes, returning the result (identity on one).
        options: the hyperparameters; ``backend`` is ignored (always the torch backend).
        chunk_bytes: as for :func:`kmeans`.

    Returns:
        A :class:`KMeansResult` whose ``assignments``/``distances`` cover the local rows and
        whose ``centroids``/``objective`` are global.
    """
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(x_local.device)
    _check_args(x_local, n_total, k, options.niter, options.nredo, chunk_bytes)
    x_local = x_local.detach().float()
    sq_norms = None if _use_fused(x_local) else row_sq_norms(x_local)  # (n_local,) every restart
    best: KMeansResult | None = None
    for redo in range(options.nredo):
        gen = torch.Generator(device="cpu").manual_seed(restart_seed(options.seed, redo))
        if options.init == "random":
            chosen = torch.randperm(n_total, generator=gen)[:k]
            centroids = fetch_rows(x_local, index_local, chosen, all_reduce_sum)
        elif (
            options.init == "kmeans++"
        ):  # D^2 sampling on a seeded sample gathered to every process
            sample = torch.randperm(n_total, generator=gen)[: min(n_total, 8 * k)]
            rows = fetch_rows(x_local, index_local, sample, all_reduce_sum)
            centroids = kmeans_plusplus(rows, k, gen)
        else:
            raise ValueError(f"unknown k-means init {options.init!r}: use 'random' or 'kmeans++'")
        if options.spherical:
            centroids = F.normalize(centroids, dim=1)
        centroids, iterations = lloyd(
            x_local,
            centroids,
            options.niter,
            options.spherical,
            options.empty,
            gen,
            chunk_bytes,
            reduce=all_reduce_sum,
        )
        assignments, distances = assign(x_local, centroids, chunk_bytes, sq_norms)
        total = all_reduce_sum(distances.double().sum().reshape(1))
        result = KMeansResult(centroids, assignments, distances, float(total[0]), iterations)
        if best is None or result.objective < best.objective:
            best = result
    assert best is not None
    return best


def fetch_rows(
    x_local: Tensor, index_local: Tensor, wanted: Tensor, all_reduce_sum: Reduce
) -> Tensor:
    """Rows with global indices ``wanted`` (S,), assembled on every process.

    Each process writes the wanted rows it owns into a zero (S, D) matrix; the sum over
    processes is the full set, since each row has exactly one owner.
    """
    wanted = wanted.to(x_local.device)
    order = torch.argsort(wanted)
    sorted_wanted = wanted[order]
    pos = torch.searchsorted(sorted_wanted, index_local.to(x_local.device)).clamp_max(
        len(wanted) - 1
    )
    mine = sorted_wanted[pos] == index_local.to(x_local.device)  # (n_local,)
    out = torch.zeros(len(wanted), x_local.shape[1], dtype=torch.float64, device=x_local.device)
    out[order[pos[mine]]] = x_local[mine].double()
    return all_reduce_sum(out).float()


def _check_args(x: Tensor, n: int, k: int, niter: int, nredo: int, chunk_bytes: int) -> None:
    """Validate k-means arguments; ``n`` is the number of points over all shards."""
    if x.dim() != 2:
        raise ValueError(f"k-means expects a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    if not 1 <= k <= n:
        raise ValueError(
            f"cannot make k={k} clusters from N={n} points: k must be between 1 and N; "
            f"lower the number of clusters or use more data"
        )
    if niter < 0 or nredo < 1:
        raise ValueError(f"need niter >= 0 and nredo >= 1, got niter={niter}, nredo={nredo}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")


def _training_sample(
    x: Tensor, k: int, max_points_per_centroid: int | None, gen: torch.Generator
) -> Tensor:
    if max_points_per_centroid is None or x.shape[0] <= k * max_points_per_centroid:
        return x
    idx = torch.randperm(x.shape[0], generator=gen)[: k * max_points_per_centroid]
    return x[idx.to(x.device)]


def _initial_centroids(
    x: Tensor, k: int, init: Init, spherical: bool, gen: torch.Generator
) -> Tensor:
    if init == "random":
        idx = torch.randperm(x.shape[0], generator=gen)[:k]
        centroids = x[idx.to(x.device)].clone()
    elif init == "kmeans++":
        centroids = kmeans_plusplus(x, k, gen)
    else:
        raise ValueError(f"unknown k-means init {init!r}: use 'random' or 'kmeans++'")
    return F.normalize(centroids, dim=1) if spherical else centroids


def kmeans_plusplus(
    x: Tensor, k: int, gen: torch.Generator, chunk_bytes: int = PASS_CHUNK_BYTES
) -> Tensor:
    """k-means++ seeding (D^2 sampling): k sequential draws, O(N * K * D) in total.

    Args:
        x: (N, D) float32 points.
        k: number of centroids to draw.
        gen: CPU generator that makes the draws reproducible.
        chunk_bytes: budget of the one (rows, D) buffer each pass over ``x`` reuses.

    Returns:
        (K, D) centroids, rows of ``x``.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = first
    closest = torch.empty(n, dtype=x.dtype, device=x.device)  # (N,) to the nearest chosen point
    distance = torch.empty_like(closest)
    buffer = _row_buffer(x, chunk_bytes)
    _sq_distances_to(x, x[first], buffer, closest)
    for i in range(1, k):
        weights = closest.clamp_min(0).double().cpu()
        total = float(weights.sum())
        if total <= 0.0:  # every point coincides with a chosen centroid: pick uniformly
            weights = torch.ones(n, dtype=torch.float64)
        idx = int(torch.multinomial(weights, 1, generator=gen))
        chosen[i] = idx
        torch.minimum(closest, _sq_distances_to(x, x[idx], buffer, distance), out=closest)
    return x[chosen.to(x.device)].clone()


def _row_buffer(x: Tensor, chunk_bytes: int) -> Tensor:
    """A (rows, D) scratch block of at most ``chunk_bytes`` for row-chunked passes over ``x``."""
    rows = max(1, min(x.shape[0], chunk_bytes // (x.element_size() * max(x.shape[1], 1))))
    return torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)


def _sq_distances_to(x: Tensor, point: Tensor, buffer: Tensor, out: Tensor) -> Tensor:
    """``out`` (N,) = ||x_i - point||^2, row chunk by row chunk through ``buffer``.

    Per row the same operations as ``(x - point).pow(2).sum(1)`` (so the same bits), without
    allocating two (N, D) temporaries per call.
    """
    rows = buffer.shape[0]
    for start in range(0, x.shape[0], rows):
        xc = x[start : start + rows]  # (n_c, D)
        part = buffer[: xc.shape[0]]
        torch.sub(xc, point, out=part).pow_(2)
        torch.sum(part, 1, out=out[start : start + rows])
    return out


def row_sq_norms(x: Tensor, chunk_bytes: int = PASS_CHUNK_BYTES) -> Tensor:
    """(N,) squared L2 norm of each row of ``x`` (N, D), in row chunks (no (N, D) temporary).

    Per row the same operations as ``x.pow(2).sum(1)``, so the same bits.
    """
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    origin = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)  # x - 0 is x, bit for bit
    return _sq_distances_to(x, origin, _row_buffer(x, chunk_bytes), out)


# The fused Triton kernel replaces the chunked product + minimum on CUDA (set False to compare).
USE_FUSED_ASSIGN = True


def fused_assign_available() -> bool:
    return USE_FUSED_ASSIGN and importlib.util.find_spec("triton") is not None


def _use_fused(x: Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.float32 and fused_assign_available()


def assign(
    x: Tensor,
    centroids: Tensor,
    chunk_bytes: int = CPU_CHUNK_BYTES,
    sq_norms: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row of ``x``, in row chunks of at most ``chunk_bytes``.

    ||x - c||^2 = ||x||^2 + 2 * (||c||^2 / 2 - x . c); only the bracket is computed per chunk.
    On CUDA with Triton the fused kernel of :mod:`pcl_scale.core.kmeans_triton` is used instead (no
    (rows, K) block ever reaches memory; products of float16-rounded inputs, as precise as TF32).

    Args:
        x: (N, D) float32 points.
        centroids: (K, D) float32 centroids.
        chunk_bytes: budget for one (rows, K) float32 block of the distance matrix.
        sq_norms: (N,) ``row_sq_norms(x)`` when the caller has it (computed here otherwise).

    Returns:
        assignments (N,) int64 and squared distances (N,) float32.
    """
    if _use_fused(x):
        from pcl_scale.core.kmeans_triton import nearest_centroid

        return nearest_centroid(x, centroids)
    assignments, best = _nearest(x, centroids, chunk_bytes)
    if sq_norms is None:
        sq_norms = row_sq_norms(x)
    return assignments, (sq_norms + 2.0 * best).clamp_min_(0.0)


def _nearest(x: Tensor, centroids: Tensor, chunk_bytes: int) -> tuple[Tensor, Tensor]:
    """(N,) nearest centroid and (N,) min_c (||c||^2 / 2 - x . c), in row chunks of ``x``.

    The argmin needs no ||x||^2: Lloyd's iterations call this, only the final assignment adds it.
    """
    n, k = x.shape[0], centroids.shape[0]
    rows = max(1, min(n, chunk_bytes // (4 * k)))
    half_sq_norms = 0.5 * centroids.pow(2).sum(1)  # (K,)
    centroids_t = centroids.t()  # (D, K)
    assignments = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    block = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        xc = x[start : start + rows]  # (n_c, D)
        out = block[: xc.shape[0]]
        torch.addmm(half_sq_norms, xc, centroids_t, beta=1.0, alpha=-1.0, out=out)  # (n_c, K)
        torch.min(out, dim=1, out=(best[start : start + rows], assignments[start : start + rows]))
    return assignments, best


def _nearest_ids(x: Tensor, centroids: Tensor, chunk_bytes: int) -> Tensor:
    """(N,) nearest centroid of every row of ``x`` (the fused kernel on CUDA, as :func:`assign`)."""
    if _use_fused(x):
        return assign(x, centroids, chunk_bytes)[0]
    return _nearest(x, centroids, chunk_bytes)[0]


def cluster_sums(x: Tensor, assignments: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (K, D) and counts (K,) of the rows of ``x``, returned as float64."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, assignments, x)
    counts = torch.bincount(assignments, minlength=k)
    return sums.double(), counts.double()


def lloyd(
    x: Tensor,
    centroids: Tensor,
    niter: int,
    spherical: bool,
    empty: EmptyPolicy,
    gen: torch.Generator,
    chunk_bytes: int = CPU_CHUNK_BYTES,
    reduce: Reduce | None = None,
) -> tuple[Tensor, int]:
    """Up to ``niter`` Lloyd iterations from ``centroids``: the final (K, D) centroids and the
    number of iterations run.

    Stops early at a fixed point: an iteration that moves no point (over all shards) and leaves
    no cluster empty under ``"reseed"`` updates the centroids from the same sums and counts as
    the iteration before, so it reproduces them exactly, and so would every later iteration
    (without drawing from ``gen``): the result is that of all ``niter`` iterations.

    ``reduce`` sums a tensor over all shards of ``x`` (an all-reduce in a sharded run; identity
    here). Everything after the reduction reads only K-sized statistics and ``gen``, so every
    shard computes the same centroids and stops at the same iteration.
    """
    k = centroids.shape[0]
    previous: Tensor | None = None
    for iteration in range(niter):
        assignments = _nearest_ids(x, centroids, chunk_bytes)  # (N,)
        sums, counts = cluster_sums(x, assignments, k)
        moved = (assignments != previous).sum() if previous is not None else counts.sum()
        stats = torch.cat([counts, moved.double().reshape(1)])  # (K + 1,): one reduction
        if reduce is not None:
            sums, stats = reduce(sums), reduce(stats)
        counts = stats[:k]
        centroids = _update_centroids(centroids, sums, counts, spherical, empty, gen)
        if previous is not None and _fixed_point(stats, empty):
            return centroids, iteration + 1
        previous = assignments
    return centroids, niter


def _fixed_point(stats: Tensor, empty: EmptyPolicy) -> bool:
    """No point moved (``stats[-1]``) and no cluster is empty (``stats[:-1]``) or empty ones keep
    their centroid: the next iteration would repeat this one."""
    if bool(stats[-1] != 0):
        return False
    return empty == "keep" or bool((stats[:-1] > 0).all())


def _update_centroids(
    old: Tensor,
    sums: Tensor,
    counts: Tensor,
    spherical: bool,
    empty: EmptyPolicy,
    gen: torch.Generator,
) -> Tensor:
    nonempty = counts > 0
    new = torch.where(nonempty[:, None], sums / counts.clamp_min(1.0)[:, None], old.double())
    if empty == "reseed" and not bool(nonempty.all()):
        new = _split_large_clusters(new, counts, gen)
    elif empty not in ("reseed", "keep"):
        raise ValueError(f"unknown empty-cluster policy {empty!r}: use 'reseed' or 'keep'")
    new = new.float()
    return F.normalize(new, dim=1) if spherical else new


def _split_large_clusters(centroids: Tensor, counts: Tensor, gen: torch.Generator) -> Tensor:
    """Give every empty cluster a perturbed copy of a donor centroid (faiss' rule, vectorised).

    Donors are drawn without replacement with probability proportional to ``count - 1``; the
    empty cluster gets ``c * (1 + eps * s)`` and the donor ``c * (1 - eps * s)`` with
    ``s = (+1, -1, +1, ...)``. When fewer clusters can donate than are empty, the remaining empty
    clusters keep their previous centroid.
    """
    empty_ids = torch.nonzero(counts == 0).squeeze(1)
    weights = (counts - 1).clamp_min(0).cpu()
    n_donors = min(int(empty_ids.numel()), int((weights > 0).sum()))
    if n_donors == 0:
        return centroids
    donors = torch.multinomial(weights, n_donors, replacement=False, generator=gen)
    donors = donors.to(centroids.device)
    empty_ids = empty_ids[:n_donors]
    d = centroids.shape[1]
    signs = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    signs[1::2] = -1.0
    donor_centroids = centroids[donors]  # (E, D)
    out = centroids.clone()
    out[empty_ids] = donor_centroids * (1.0 + _SPLIT_EPS * signs)
    out[donors] = donor_centroids * (1.0 - _SPLIT_EPS * signs)
    return out
