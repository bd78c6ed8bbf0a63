"""The E-step: sharded extraction by dataset index, then clustering; identical results everywhere.

Each rank embeds the strided shard ``range(rank, N, world)`` of the deterministic eval view (no
padding, so no duplicates). Then, by mode:

* ``gather``: rank 0 places every row at its dataset index, asserts that each index arrived exactly
  once, clusters every granularity (faiss or torch) and estimates phi; the result is broadcast.
  Only rank 0 holds the N x D matrix. On a CPU it clusters with the threads of its host's waiting
  ranks too (:meth:`pcl_scale.distributed.comm.Comm.idle_host_threads`).
* ``sharded``: features never leave their rank. k-means runs on the shards with all-reduced
  per-cluster sums and counts (:func:`pcl_scale.core.kmeans.kmeans_sharded`), phi from all-reduced
  per-cluster distance sums and counts, and the assignments are all-gathered as int32 by index.

Either way every rank ends the E-step with the same :class:`ClusterResult`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.core.clusters import Clustering, ClusterResult, cluster_features
from pcl_scale.core.concentration import cluster_distance_stats, concentration_from_stats
from pcl_scale.core.kmeans import KMeansOptions, granularity_seed, kmeans_sharded
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import (
    ExtractOptions,
    all_gather_by_index,
    extract_shard,
    gather_by_index,
)


@dataclass(frozen=True)
class ClusteringPlan:
    """What the E-step computes: K per granularity, phi's target mean, k-means, the mode."""

    num_clusters: tuple[int, ...]
    temperature: float
    kmeans: KMeansOptions = KMeansOptions()  # noqa: RUF009 (frozen)
    mode: str = "gather"  # "gather" or "sharded" (resolved by :func:`choose_mode`)
    fixed_concentration: bool = False  # every phi = temperature: ablates phi, keeps the rest


@dataclass(frozen=True)
class EStepReport:
    """One E-step's result with what the run logs about it."""

    clusters: ClusterResult
    record: dict[str, Any]


def estep(
    embed: Callable[[Tensor], Tensor],
    dataset: Any,
    comm: Comm,
    opts: ExtractOptions,
    plan: ClusteringPlan,
) -> EStepReport:
    """:func:`run_estep`, timed, with the cluster statistics the run log records."""
    start = time.perf_counter()
    clusters = run_estep(embed, dataset, comm, opts, plan)
    if plan.fixed_concentration:
        clusters = with_constant_phi(clusters, plan.temperature)
    record: dict[str, Any] = {"mode": plan.mode, "seconds": time.perf_counter() - start}
    record.update(cluster_statistics(clusters))
    return EStepReport(clusters, record)


def with_constant_phi(clusters: ClusterResult, temperature: float) -> ClusterResult:
    """Every prototype's phi set to ``temperature``: ProtoNCE then scales all prototypes alike."""
    return ClusterResult(
        tuple(
            dataclasses.replace(c, phi=torch.full_like(c.phi, temperature))
            for c in clusters.clusterings
        )
    )


def cluster_statistics(clusters: ClusterResult) -> dict[str, Any]:
    """Per granularity m: empty clusters, the largest, size and phi quantiles (K-sized work)."""
    record: dict[str, Any] = {}
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    for m, c in enumerate(clusters.clusterings):
        sizes = torch.bincount(c.assignments.long(), minlength=c.num_prototypes).float()
        record[f"k{m}_empty"] = int((sizes == 0).sum())
        record[f"k{m}_max_size"] = int(sizes.max())
        phi = c.phi.float().cpu()
        for q, size_q, phi_q in zip(
            (10, 50, 90), sizes.cpu().quantile(quantiles), phi.quantile(quantiles), strict=True
        ):
            record[f"k{m}_size_p{q}"] = float(size_q)
            record[f"k{m}_phi_p{q}"] = float(phi_q)
        record[f"k{m}_phi_min"] = float(phi.min())
        record[f"k{m}_phi_max"] = float(phi.max())
    return record


def run_estep(
    embed: Callable[[Tensor], Tensor],
    dataset: Any,
    comm: Comm,
    opts: ExtractOptions,
    plan: ClusteringPlan,
) -> ClusterResult:
    """Extract, then cluster in ``plan.mode``; the same result, on CPU, on every rank."""
    indices, feats = extract_shard(embed, dataset, comm, opts)
    n = len(dataset)
    if plan.mode == "sharded":
        return cluster_sharded(indices, feats.to(opts.device), n, comm, plan)
    full = gather_by_index(indices, feats, n, comm)
    result = None
    if full is not None:  # k-means on the accelerator when there is one
        with comm.idle_host_threads():  # on a CPU, also the threads of the ranks that wait
            result = cluster_features(
                full.to(opts.device), plan.num_clusters, plan.temperature, plan.kmeans
            )
        result = result.to("cpu")
    return broadcast_clusters(result, plan.num_clusters, n, feats.shape[1], comm)


def cluster_sharded(
    indices: Tensor, feats: Tensor, n: int, comm: Comm, plan: ClusteringPlan
) -> ClusterResult:
    """Sharded k-means and phi at every granularity; assignments all-gathered as int32."""
    clusterings = []
    for m, k in enumerate(plan.num_clusters):
        options = dataclasses.replace(plan.kmeans, seed=granularity_seed(plan.kmeans.seed, m))
        res = kmeans_sharded(feats, indices, n, k, comm.all_reduce_sum, options)
        dist_sum, count = cluster_distance_stats(res.distances, res.assignments, k)
        phi = concentration_from_stats(
            comm.all_reduce_sum(dist_sum), comm.all_reduce_sum(count), plan.temperature
        )
        assignments = all_gather_by_index(indices, res.assignments.int(), n, comm)
        clusterings.append(
            Clustering(F.normalize(res.centroids, dim=1).cpu(), phi.cpu(), assignments)
        )
    return ClusterResult(tuple(clusterings))


def broadcast_clusters(
    result: ClusterResult | None, num_clusters: Sequence[int], n: int, dim: int, comm: Comm
) -> ClusterResult:
    """Send rank 0's result to every rank (shapes are known everywhere from the config)."""
    clusterings = []
    for m, k in enumerate(num_clusters):
        if result is not None:
            c = result.clusterings[m]
            protos, phi, assign = c.prototypes.float(), c.phi.float(), c.assignments.int()
        else:
            protos, phi = torch.empty(k, dim), torch.empty(k)
            assign = torch.empty(n, dtype=torch.int32)
        clusterings.append(
            Clustering(comm.broadcast(protos), comm.broadcast(phi), comm.broadcast(assign))
        )
    return ClusterResult(tuple(clusterings))


def choose_mode(
    mode: str, n: int, dim: int, world_size: int, backend: str, device: torch.device,
    gather_max_bytes: int,
) -> tuple[str, str]:  # fmt: skip
    """Resolve ``estep.mode`` (for the resolved k-means ``backend``), and say why.

    ``auto``: one process gathers (nothing to shard). With several, ``sharded`` when the features
    would not fit rank 0's budget (N * D * 4 bytes > ``gather_max_bytes``), on CUDA (measured
    faster than gather on one H200, and no rank waits for rank 0), or when the backend is the
    torch one (both modes run the same k-means, and sharding spreads it); ``gather`` otherwise,
    for faiss on CPUs. docs/scaling.md has the measurements behind the rule.
    """
    if mode != "auto":
        return mode, f"estep.mode={mode}"
    if world_size == 1:
        return "gather", "auto, one process"
    if n * dim * 4 > gather_max_bytes:
        return "sharded", f"auto: N x D features ({n * dim * 4 / 2**30:.1f} GiB) over the budget"
    if device.type == "cuda":
        return "sharded", "auto, several processes on CUDA"
    if backend != "faiss":
        return "sharded", "auto, several processes with the torch backend"
    return "gather", "auto, several CPU processes with faiss"
