"""The E-step: sharded feature extraction by dataset index, clustering, and the broadcast result.

Each rank embeds the strided shard ``range(rank, N, world)`` of the deterministic eval view (no
padding, so no duplicates); rank 0 places every row at its dataset index and asserts that each
index arrived exactly once, clusters every granularity and estimates phi; the result is
broadcast, so every rank ends the E-step with the same :class:`ClusterResult`. Only rank 0 holds
the N x D matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pcl_scale.clusters import Clustering, ClusterResult, cluster_features
from pcl_scale.distributed import Comm


@dataclass(frozen=True)
class ExtractOptions:
    batch_size: int
    num_workers: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    progress: bool = False
    desc: str = "E-step"


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
    with torch.inference_mode(), opts.autocast():
        for images, index in tqdm(loader, desc=opts.desc, disable=not opts.progress, leave=False):
            feats.append(embed(images.to(opts.device, non_blocking=True)).float().cpu())
            indices.append(index)
    dim = feats[0].shape[1] if feats else _probe_dim(embed, dataset, opts)
    if not feats:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dim)
    return torch.cat(indices).long(), torch.cat(feats)


def _probe_dim(embed: Callable[[Tensor], Tensor], dataset: Any, opts: ExtractOptions) -> int:
    with torch.inference_mode(), opts.autocast():
        return int(embed(dataset[0][0][None].to(opts.device)).shape[1])


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


def run_estep(
    embed: Callable[[Tensor], Tensor],
    dataset: Any,
    comm: Comm,
    opts: ExtractOptions,
    num_clusters: Sequence[int],
    temperature: float,
    kmeans_kwargs: dict[str, Any],
) -> tuple[ClusterResult, Tensor | None]:
    """Extract, cluster on rank 0, broadcast.

    Returns:
        The cluster result (on CPU, identical on every rank) and the (N, D) features on rank 0
        (None elsewhere).
    """
    indices, feats = extract_shard(embed, dataset, comm, opts)
    n = len(dataset)
    full = gather_by_index(indices, feats, n, comm)
    result = None
    if full is not None:  # k-means on the accelerator when there is one
        result = cluster_features(full.to(opts.device), num_clusters, temperature, **kmeans_kwargs)
        result = result.to("cpu")
    return broadcast_clusters(result, num_clusters, n, feats.shape[1], comm), full
