"""The faiss k-means backend: Lloyd iterations and the final assignment with faiss.

faiss-cpu and faiss-gpu install the same ``faiss`` module; with faiss-gpu and CUDA every visible
GPU is used. The starting centroids come from :func:`pcl_scale.core.kmeans.kmeans`, so both
backends start from the same seeded initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def faiss_available() -> bool:
    """True when the ``faiss`` module (faiss-cpu or faiss-gpu) imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "k-means backend 'faiss' needs the faiss module: pip install 'pcl-scale[faiss]' "
            "(CPU) or 'pcl-scale[gpu]' (CUDA), or use backend='torch'"
        ) from err
    return faiss


def faiss_lloyd_and_assign(
    x: Tensor, train: Tensor, init_centroids: Tensor, niter: int, spherical: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations, then the final assignment.

    Returns:
        (K, D) centroids, (N,) int64 nearest ids and (N,) squared distances, on ``x.device``.
    """
    faiss = _import_faiss()
    xs = np.ascontiguousarray(x.cpu().numpy())
    ts = xs if train is x else np.ascontiguousarray(train.cpu().numpy())
    k, d = init_centroids.shape
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.nredo = 1
    params.spherical = spherical
    params.verbose = False
    params.min_points_per_centroid = 1
    params.max_points_per_centroid = max(1, math.ceil(ts.shape[0] / k))  # no faiss subsampling
    clus = faiss.Clustering(d, k, params)
    init = np.ascontiguousarray(init_centroids.cpu().numpy().reshape(-1))
    faiss.copy_array_to_vector(init, clus.centroids)
    use_gpu = _faiss_use_gpu(faiss)
    train_index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if use_gpu:
        train_index = faiss.index_cpu_to_all_gpus(train_index)
    if niter > 0:
        clus.train(ts, train_index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)

    search_index = faiss.IndexFlatL2(d)
    if use_gpu:
        search_index = faiss.index_cpu_to_all_gpus(search_index)
    search_index.add(centroids)
    dist, idx = search_index.search(xs, 1)
    distances = torch.from_numpy(np.ascontiguousarray(dist[:, 0])).clamp_min(0.0).to(x.device)
    assignments = torch.from_numpy(idx[:, 0].astype(np.int64)).to(x.device)
    return torch.from_numpy(centroids).to(x.device), assignments, distances


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu, or when faiss is missing)."""
    if not faiss_available():
        return 0
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def _faiss_use_gpu(faiss_module: object) -> bool:
    get_num_gpus = getattr(faiss_module, "get_num_gpus", None)
    return bool(get_num_gpus is not None and get_num_gpus() > 0 and torch.cuda.is_available())
