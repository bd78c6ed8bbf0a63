"""Concentration (phi) of each prototype, as the PCL reference estimates it.

For cluster c with Z_c members v'_z and (un-normalised) k-means centroid mu_c:

    phi_c = mean_z ||v'_z - mu_c||_2 / log(Z_c + alpha),      alpha = 10

Clusters with Z_c <= 1 (singletons and empty clusters) get the maximum phi over the other
clusters; phi is then clipped to its [10th, 90th] percentile and rescaled so that
mean(phi) = temperature.

Floor (not in the reference): a cluster of exact duplicates has phi = 0, so c / phi would be
infinite, and with more than 10% such clusters the clip cannot lift them. Before the clip, phi is
floored at ``PHI_FLOOR`` x its largest value; when that is 0 too (every cluster is duplicates),
every phi is ``temperature``. On ordinary features the floor never binds.

The estimate is split in two so that a sharded E-step can all-reduce the K-sized statistics:
:func:`cluster_distance_stats` (per shard) and :func:`concentration_from_stats` (on the sums).
"""

from __future__ import annotations

import torch
from torch import Tensor

PHI_FLOOR = 0.01  # the smallest phi, as a fraction of the largest, before the percentile clip


def cluster_distance_stats(
    sq_distances: Tensor, assignments: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Per-cluster sum of L2 distances and member counts.

    Args:
        sq_distances: (N,) squared L2 distance of each point to its (un-normalised) centroid.
        assignments: (N,) int64 cluster id of each point, in [0, k).
        k: number of clusters.

    Returns:
        dist_sum (K,) float64 sum of ||v'_z - mu_c||_2 over members, and count (K,) float64.
    """
    dist = sq_distances.double().clamp_min(0.0).sqrt()  # (N,)
    dist_sum = torch.zeros(k, dtype=torch.float64, device=dist.device)
    dist_sum.index_add_(0, assignments, dist)
    count = torch.bincount(assignments, minlength=k).double()
    return dist_sum, count


def concentration_from_stats(
    dist_sum: Tensor,
    count: Tensor,
    temperature: float,
    alpha: float = 10.0,
    clip_percentiles: tuple[float, float] = (10.0, 90.0),
) -> Tensor:
    """phi (K,) float32 from per-cluster distance sums and counts (see the module docstring).

    When no cluster has two or more members, or none has a positive spread, every phi equals
    ``temperature``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    lo_pct, hi_pct = clip_percentiles
    if not 0.0 <= lo_pct <= hi_pct <= 100.0:
        raise ValueError(
            f"clip percentiles must satisfy 0 <= lo <= hi <= 100, got {clip_percentiles}"
        )
    big = count > 1
    if not bool(big.any()):
        return torch.full_like(count, temperature, dtype=torch.float32)
    phi = dist_sum / count.clamp_min(1.0) / torch.log(count + alpha)  # (K,)
    largest = phi[big].max()
    if not bool(largest > 0):  # every cluster is exact duplicates: no spread to tell them apart
        return torch.full_like(count, temperature, dtype=torch.float32)
    phi = torch.where(big, phi, largest).clamp_min(PHI_FLOOR * largest)
    q = torch.tensor([lo_pct / 100.0, hi_pct / 100.0], dtype=phi.dtype, device=phi.device)
    lo, hi = torch.quantile(phi, q)  # linear interpolation, as numpy.percentile
    phi = phi.clamp(lo, hi)
    return (temperature * phi / phi.mean()).float()


def concentration(
    sq_distances: Tensor,
    assignments: Tensor,
    k: int,
    temperature: float,
    alpha: float = 10.0,
) -> Tensor:
    """phi (K,) for one clustering of N points (see the module docstring).

    Args:
        sq_distances: (N,) squared distance of each point to its un-normalised centroid.
        assignments: (N,) int64 cluster ids.
        k: number of clusters.
        temperature: target mean of phi (the InfoNCE temperature in PCL).
        alpha: smoothing constant inside the log.
    """
    dist_sum, count = cluster_distance_stats(sq_distances, assignments, k)
    return concentration_from_stats(dist_sum, count, temperature, alpha)
