"""The faiss k-means backend: Lloyd iterations and the final assignment with faiss.

faiss-cpu and faiss-gpu install the same ``faiss`` module. With faiss-gpu, faiss clusters on the
GPU that holds the features (rank 0's own, in gather mode) or on an explicit list of devices, never
on every GPU of the node: those are the other ranks' training memory. Its GPU resources
(:class:`FaissGpus`, scratch memory per device) are made once and shared by every index of an
E-step. The starting centroids come from :func:`pcl_scale.core.kmeans.kmeans`, so both backends
start from the same seeded initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FaissGpus:
    """faiss GPU resources on chosen devices, made once and reused by every index built on them.

    ``faiss.index_cpu_to_all_gpus`` makes new resources on every visible GPU at each call; an
    E-step builds two indexes per restart and granularity, so it holds one of these instead.
    """

    devices: tuple[int, ...]
    resources: tuple[Any, ...]

    @classmethod
    def create(cls, devices: Sequence[int]) -> FaissGpus:
        faiss = _import_faiss()
        return cls(tuple(devices), tuple(faiss.StandardGpuResources() for _ in devices))

    def index(self, cpu_index: Any) -> Any:
        """``cpu_index`` on these devices (sharded over them when there are several)."""
        faiss = _import_faiss()
        return faiss.index_cpu_to_gpu_multiple_py(
            list(self.resources), cpu_index, gpus=list(self.devices)
        )


def faiss_devices(requested: Sequence[int], device: torch.device) -> tuple[int, ...]:
    """The GPUs faiss clusters on: ``requested`` when given, else the features' own GPU.

    Features on a CPU, or faiss without GPUs, give ``()``: faiss runs on the CPU.
    """
    if requested:
        return tuple(int(d) for d in requested)
    if device.type != "cuda" or faiss_gpu_count() == 0:
        return ()
    return (device.index if device.index is not None else torch.cuda.current_device(),)


def faiss_gpus_for(requested: Sequence[int], device: torch.device) -> FaissGpus | None:
    """:class:`FaissGpus` on :func:`faiss_devices`, or None when faiss runs on the CPU."""
    devices = faiss_devices(requested, device)
    return FaissGpus.create(devices) if devices else None


def faiss_lloyd_and_assign(
    x: Tensor,
    train: Tensor,
    init_centroids: Tensor,
    niter: int,
    spherical: bool,
    gpus: FaissGpus | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations, then the final assignment (on ``gpus`` when given, else the CPU).

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
    train_index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if gpus is not None:
        train_index = gpus.index(train_index)
    if niter > 0:
        clus.train(ts, train_index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)

    search_index = faiss.IndexFlatL2(d)
    if gpus is not None:
        search_index = gpus.index(search_index)
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
