"""The cluster result of one E-step: prototypes, concentrations and assignments per granularity."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.core.concentration import concentration
from pcl_scale.core.kmeans import KMeansOptions, granularity_seed, kmeans, resolve_backend
from pcl_scale.core.kmeans_faiss import faiss_gpus_for
from pcl_scale.core.negatives import NegativeSampler


@dataclass(frozen=True)
class Clustering:
    """One granularity of the E-step.

    Attributes:
        prototypes: (K, D) L2-normalised centroids c^m (constants for the epoch).
        phi: (K,) concentration of each prototype (mean = temperature).
        assignments: (N,) int32 prototype id of every dataset index (``im2cluster``), kept in
            host memory: one copy per process, never one per GPU (800 MB per granularity at 100M
            images); :meth:`ClusterResult.positives` looks a batch up before its copy to the GPU.
    """

    prototypes: Tensor
    phi: Tensor
    assignments: Tensor

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    def to(self, device: torch.device | str) -> Clustering:
        """Prototypes and phi on ``device`` (K-sized); the assignments stay where they are."""
        return Clustering(self.prototypes.to(device), self.phi.to(device), self.assignments)


@dataclass(frozen=True)
class PrototypeTable:
    """Every granularity's prototypes in one table, as the loss reads them.

    Attributes:
        scaled: (sum of K, D) float32; row ``offsets[m] + j`` is prototype j of granularity m
            divided by its concentration, c_j / phi_j, so that one gather and one matmul give the
            ProtoNCE logits of all granularities.
        offsets: (M, 1) int64 first row of each granularity.
        sampler: draws the negatives of all granularities at once.
    """

    scaled: Tensor
    offsets: Tensor
    sampler: NegativeSampler


@dataclass(frozen=True)
class ClusterResult:
    """All M granularities of one E-step, identical on every rank."""

    clusterings: tuple[Clustering, ...]

    def __len__(self) -> int:
        return len(self.clusterings)

    @functools.cached_property
    def table(self) -> PrototypeTable:
        """The loss's view of the prototypes, built on first use (once per E-step and device)."""
        device = self.clusterings[0].prototypes.device
        scaled = torch.cat(
            [c.prototypes.float() / c.phi.float()[:, None] for c in self.clusterings]
        )
        ks = [c.num_prototypes for c in self.clusterings]
        sizes = torch.tensor(ks)
        offsets = (torch.cumsum(sizes, 0) - sizes)[:, None].to(device)
        return PrototypeTable(scaled, offsets, NegativeSampler(ks, device))

    def positives(self, index: Tensor) -> Tensor:
        """(M, B) int64 prototype id of each sample of ``index`` (B,) at every granularity.

        Looked up where the assignments live (host memory): pass the loader's CPU index, so the
        GPU never waits for a copy back; the (M, B) result is on that device too.
        """
        where = self.clusterings[0].assignments.device
        ids = torch.stack([c.assignments[index.to(where)] for c in self.clusterings])
        return ids.long().to(index.device)

    def to(self, device: torch.device | str) -> ClusterResult:
        return ClusterResult(tuple(c.to(device) for c in self.clusterings))

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensor dict (safetensors-friendly): ``{m}.prototypes``, ``{m}.phi``, ..."""
        out: dict[str, Tensor] = {}
        for m, c in enumerate(self.clusterings):
            out[f"{m}.prototypes"] = c.prototypes.contiguous()
            out[f"{m}.phi"] = c.phi.contiguous()
            out[f"{m}.assignments"] = c.assignments.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ClusterResult:
        m = len({key.split(".")[0] for key in state})
        return cls(
            tuple(
                Clustering(state[f"{i}.prototypes"], state[f"{i}.phi"], state[f"{i}.assignments"])
                for i in range(m)
            )
        )


def random_clusters(
    n: int, num_clusters: Sequence[int], dim: int, temperature: float = 0.1, seed: int = 0
) -> ClusterResult:
    """A result of the right shapes with random prototypes and assignments (benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    clusterings = []
    for k in num_clusters:
        prototypes = F.normalize(torch.randn(k, dim, generator=g), dim=1)
        phi = temperature * (0.5 + torch.rand(k, generator=g))
        clusterings.append(Clustering(prototypes, phi, torch.randint(k, (n,), generator=g)))
    return ClusterResult(tuple(clusterings))


def cluster_features(
    features: Tensor,
    num_clusters: Sequence[int],
    temperature: float,
    options: KMeansOptions = KMeansOptions(),  # noqa: B008 (frozen)
) -> ClusterResult:
    """Run k-means at every granularity and estimate phi, as the reference E-step does.

    Granularity m is seeded by ``granularity_seed(options.seed, m)``. Prototypes are the
    L2-normalised centroids; phi uses distances to the un-normalised ones. faiss-gpu's resources
    are made once here for every granularity and restart, and freed on return.

    Args:
        features: (N, D) embeddings addressed by dataset index (row i = sample i).
        num_clusters: K per granularity, e.g. (25000, 50000, 100000).
        temperature: target mean of phi.
        options: the k-means hyperparameters.
    """
    backend = resolve_backend(options.backend, features.device)[0]
    gpus = faiss_gpus_for(options.faiss_gpus, features.device) if backend == "faiss" else None
    clusterings = []
    for m, k in enumerate(num_clusters):
        granularity = dataclasses.replace(options, seed=granularity_seed(options.seed, m))
        res = kmeans(features, k, **dataclasses.asdict(granularity), gpu_resources=gpus)
        phi = concentration(res.distances, res.assignments, k, temperature)
        assignments = res.assignments.int().cpu()  # (N,) int32, host memory
        clusterings.append(Clustering(F.normalize(res.centroids, dim=1), phi, assignments))
    return ClusterResult(tuple(clusterings))
