"""The E-step: sharded extraction by dataset index, then clustering; identical results everywhere.

Each rank embeds the strided shard ``range(rank, N, world)`` of the deterministic eval view (no
padding, so no duplicates). Then, by mode:

* ``gather``: rank 0 places every row at its dataset index, asserts that each index arrived exactly
  once, clusters every granularity (faiss or torch) and estimates phi; the result is broadcast.
  Only rank 0 holds the N x D matrix. On a CPU it clusters with the threads of its host's waiting
  ranks too (:meth:`pcl_scale.distributed.Comm.idle_host_threads`).
* ``sharded``: features never leave their rank. k-means runs on the shards with all-reduced
  per-cluster sums and counts (:func:`pcl_scale.kmeans.kmeans_sharded`), phi from all-reduced
  per-cluster distance sums and counts, and the assignments are all-gathered as int32 by index.

Either way every rank ends the E-step with the same :class:`ClusterResult`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pcl_scale.clusters import Clustering, ClusterResult, cluster_features
from pcl_scale.concentration import cluster_distance_stats, concentration_from_stats
from pcl_scale.distributed import Comm
from pcl_scale.kmeans import kmeans_sharded


@dataclass(frozen=True)
class ExtractOptions:
    batch_size: int
    num_workers: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    progress: bool = False
    desc: str = "E-step"
    # The encoder's forward is itself a collective (ZeRO-3 gathers parameters per layer): every
    # rank then runs the same number of forwards, and autograd's no_grad replaces inference
    # mode, whose tensors ZeRO-3 cannot re-partition.
    collective: bool = False


def extract_shard(
    embed: Callable[[Tensor], Tensor], dataset: Any, comm: Comm, opts: ExtractOptions
) -> tuple[Tensor, Tensor]:
    """Embed this rank's strided shard.

    Args:
        embed: maps a (B, 3, H, W) batch to (B, D) features (e.g. the momentum encoder).
        dataset: yields ``(image tensor, dataset index)``.

    Returns:
        indices (n_local,) int64 and features (n_local, D) float32 on CPU.
    """
    shard = Subset(dataset, range(comm.rank, len(dataset), comm.world_size))
    loader = DataLoader(shard, batch_size=opts.batch_size, num_workers=opts.num_workers)
    indices, feats = [], []
    grad_off = torch.no_grad() if opts.collective else torch.inference_mode()
    with grad_off, opts.autocast():
        for images, index in tqdm(loader, desc=opts.desc, disable=not opts.progress, leave=False):
            feats.append(embed(images.to(opts.device, non_blocking=True)).float().cpu())
            indices.append(index)
        # the largest shard's batch count; shards differ by at most one sample
        largest_shard = -(-len(dataset) // comm.world_size)
        lockstep = -(-largest_shard // opts.batch_size)
        extra = lockstep - len(feats) if opts.collective else 0
        probe = None
        for _ in range(max(extra, 0 if feats else 1)):  # keep in step; or learn D on an empty shard
            probe = embed(dataset[0][0][None].to(opts.device))
    if not feats:
        assert probe is not None
        return torch.empty(0, dtype=torch.long), torch.empty(0, probe.shape[1])
    return torch.cat(indices).long(), torch.cat(feats)


def extract_all(
    embed: Callable[[Tensor], Tensor], dataset: Any, comm: Comm, opts: ExtractOptions
) -> Tensor | None:
    """(N, D) features of the whole dataset on rank 0 (None elsewhere): sharded extraction,
    then :func:`gather_by_index`."""
    indices, feats = extract_shard(embed, dataset, comm, opts)
    return gather_by_index(indices, feats, len(dataset), comm)


def gather_by_index(indices: Tensor, feats: Tensor, n: int, comm: Comm) -> Tensor | None:
    """Assemble the (N, D) matrix on rank 0 by dataset index (None on other ranks).

    Shards differ in size by at most one row; they are padded with index -1 for the collective
    and the padding is dropped by index. Raises when any index is missing or repeated.
    """
    width = -(-n // comm.world_size)  # ceil
    pad = width - indices.shape[0]
    idx = torch.cat([indices, torch.full((pad,), -1, dtype=torch.long)])
    val = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
    all_idx, all_val = comm.gather_to_main(idx), comm.gather_to_main(val)
    if all_idx is None or all_val is None:
        return None
    flat_idx, flat_val = torch.cat(all_idx), torch.cat(all_val)
    keep = flat_idx >= 0
    flat_idx, flat_val = flat_idx[keep], flat_val[keep]
    counts = torch.bincount(flat_idx, minlength=n)
    if flat_idx.numel() != n or counts.numel() != n or not bool((counts == 1).all()):
        missing = int((counts[:n] == 0).sum())
        raise RuntimeError(
            f"E-step coverage check failed: {flat_idx.numel()} features for N={n} samples, "
            f"{missing} indices missing"
        )
    out = torch.empty(n, feats.shape[1], dtype=feats.dtype)
    out[flat_idx] = flat_val
    return out


def broadcast_clusters(
    result: ClusterResult | None, num_clusters: Sequence[int], n: int, dim: int, comm: Comm
) -> ClusterResult:
    """Send rank 0's result to every rank (shapes are known everywhere from the config)."""
    clusterings = []
    for m, k in enumerate(num_clusters):
        if result is not None:
            c = result.clusterings[m]
            protos, phi, assign = c.prototypes.float(), c.phi.float(), c.assignments.long()
        else:
            protos, phi = torch.empty(k, dim), torch.empty(k)
            assign = torch.empty(n, dtype=torch.long)
        clusterings.append(
            Clustering(comm.broadcast(protos), comm.broadcast(phi), comm.broadcast(assign))
        )
    return ClusterResult(tuple(clusterings))


def all_gather_by_index(indices: Tensor, values: Tensor, n: int, comm: Comm) -> Tensor:
    """(N,) values on every rank from the per-rank (index, value) pairs, coverage checked."""
    width = -(-n // comm.world_size)
    pad = width - indices.shape[0]
    idx = comm.all_gather_cat(torch.cat([indices.cpu(), torch.full((pad,), -1, dtype=torch.long)]))
    val = comm.all_gather_cat(torch.cat([values.cpu(), values.new_zeros(pad).cpu()]))
    keep = idx >= 0
    idx, val = idx[keep], val[keep]
    if idx.numel() != n or not bool((torch.bincount(idx, minlength=n) == 1).all()):
        raise RuntimeError(f"E-step coverage check failed: {idx.numel()} values for N={n} samples")
    out = torch.empty(n, dtype=values.dtype)
    out[idx] = val
    return out


def cluster_sharded(
    indices: Tensor,
    feats: Tensor,
    n: int,
    comm: Comm,
    num_clusters: Sequence[int],
    temperature: float,
    kmeans_kwargs: dict[str, Any],
) -> ClusterResult:
    """Sharded k-means and phi at every granularity; assignments all-gathered as int32."""
    kw = {k: v for k, v in kmeans_kwargs.items() if k != "backend"}  # always the torch backend
    seed = kw.pop("seed", 0)
    clusterings = []
    for m, k in enumerate(num_clusters):
        res = kmeans_sharded(feats, indices, n, k, comm.all_reduce_sum, seed=seed + m, **kw)
        dist_sum, count = cluster_distance_stats(res.distances, res.assignments, k)
        phi = concentration_from_stats(
            comm.all_reduce_sum(dist_sum), comm.all_reduce_sum(count), temperature
        )
        assignments = all_gather_by_index(indices, res.assignments.int(), n, comm)
        clusterings.append(
            Clustering(F.normalize(res.centroids, dim=1).cpu(), phi.cpu(), assignments)
        )
    return ClusterResult(tuple(clusterings))


def run_estep(
    embed: Callable[[Tensor], Tensor],
    dataset: Any,
    comm: Comm,
    opts: ExtractOptions,
    num_clusters: Sequence[int],
    temperature: float,
    kmeans_kwargs: dict[str, Any],
    mode: str = "gather",
) -> ClusterResult:
    """Extract, then cluster in ``mode`` (``gather`` or ``sharded``); identical on every rank.

    Returns:
        The cluster result, on CPU.
    """
    indices, feats = extract_shard(embed, dataset, comm, opts)
    n = len(dataset)
    if mode == "sharded":
        return cluster_sharded(
            indices, feats.to(opts.device), n, comm, num_clusters, temperature, kmeans_kwargs
        )
    full = gather_by_index(indices, feats, n, comm)
    result = None
    if full is not None:  # k-means on the accelerator when there is one
        with comm.idle_host_threads():  # on a CPU, also the threads of the ranks that wait
            result = cluster_features(
                full.to(opts.device), num_clusters, temperature, **kmeans_kwargs
            )
        result = result.to("cpu")
    return broadcast_clusters(result, num_clusters, n, feats.shape[1], comm)


def choose_mode(
    mode: str, n: int, dim: int, world_size: int, faiss_ok: bool, gather_max_bytes: int
) -> str:
    """Resolve ``estep.mode``; ``auto`` follows the rule documented in docs/scaling.md.

    One process: ``gather`` (nothing to shard). Several: ``sharded`` when the features would not
    fit rank 0's budget (N * D * 4 bytes > ``gather_max_bytes``) or when faiss is missing (then
    both modes run the same torch k-means, and sharding spreads the work); ``gather`` otherwise.
    """
    if mode != "auto":
        return mode
    if world_size == 1:
        return "gather"
    if n * dim * 4 > gather_max_bytes or not faiss_ok:
        return "sharded"
    return "gather"
