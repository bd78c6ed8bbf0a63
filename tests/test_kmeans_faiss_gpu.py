"""faiss-gpu placement, with a fake faiss-gpu: the real faiss-cpu plus recording GPU entry points.

The fake's GPU indexes are the CPU indexes themselves, so the clustering is real; what is checked
is which devices faiss is asked for and how often it makes GPU resources.
"""

import sys
import types
from typing import Any

import pytest
import torch

from pcl_scale.config import Config, ConfigError
from pcl_scale.core.clusters import cluster_features
from pcl_scale.core.kmeans import KMeansOptions, faiss_available
from pcl_scale.core.kmeans_faiss import faiss_devices
from pcl_scale.validation import validate

pytestmark = pytest.mark.skipif(not faiss_available(), reason="needs faiss (faiss-cpu)")


def fake_faiss_gpu(ngpu: int) -> Any:
    """faiss-cpu with ``ngpu`` pretend GPUs; ``made`` counts resources, ``placed`` the indexes."""
    import faiss as real

    fake: Any = types.ModuleType("faiss")
    fake.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    fake.made, fake.placed = [], []

    class StandardGpuResources:
        def __init__(self) -> None:
            fake.made.append(self)

    def index_cpu_to_gpu_multiple_py(resources, index, co=None, gpus=None):
        fake.placed.append((tuple(resources), tuple(gpus)))
        return index

    def index_cpu_to_all_gpus(index, co=None, ngpu=-1):  # faiss' own: resources on every GPU
        resources = [StandardGpuResources() for _ in range(fake.get_num_gpus())]
        return index_cpu_to_gpu_multiple_py(resources, index, co, range(len(resources)))

    fake.get_num_gpus = lambda: ngpu
    fake.StandardGpuResources = StandardGpuResources
    fake.index_cpu_to_gpu_multiple_py = index_cpu_to_gpu_multiple_py
    fake.index_cpu_to_all_gpus = index_cpu_to_all_gpus
    return fake


def test_an_estep_makes_faiss_gpu_resources_once_on_the_devices_asked_for(monkeypatch):
    x = torch.randn(600, 8, generator=torch.Generator().manual_seed(0))
    on_cpu = KMeansOptions(niter=3, nredo=5, backend="faiss")
    options = KMeansOptions(niter=3, nredo=5, backend="faiss", faiss_gpus=(1,))
    expected = cluster_features(x, (10, 20, 30), 0.2, on_cpu)
    fake = fake_faiss_gpu(ngpu=8)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    result = cluster_features(x, (10, 20, 30), 0.2, options)
    assert len(fake.made) == 1  # one E-step, one device: one set of resources
    assert len(fake.placed) == 2 * 3 * 5  # train + search index per restart and granularity
    assert {gpus for _, gpus in fake.placed} == {(1,)}
    assert {resources for resources, _ in fake.placed} == {(fake.made[0],)}
    for a, b in zip(result.clusterings, expected.clusterings, strict=True):
        assert torch.equal(a.assignments, b.assignments)


def test_faiss_clusters_on_the_features_gpu_unless_told_otherwise(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss_gpu(ngpu=8))
    assert faiss_devices((), torch.device("cuda", 3)) == (3,)  # rank 3's own GPU, not all 8
    assert faiss_devices((0, 2), torch.device("cuda", 3)) == (0, 2)
    assert faiss_devices((), torch.device("cpu")) == ()
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss_gpu(ngpu=0))  # faiss-cpu
    assert faiss_devices((), torch.device("cuda", 0)) == ()


@pytest.mark.parametrize(
    "ngpu, backend, devices, message",
    [
        (0, "faiss", [0], "needs faiss-gpu"),
        (4, "torch", [0], "faiss backend only"),
        (4, "faiss", [4], "distinct GPU ids in 0..3"),
        (4, "auto", [1, 1], "distinct GPU ids"),
    ],
)
def test_bad_faiss_gpus_are_refused(monkeypatch, ngpu, backend, devices, message):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss_gpu(ngpu))
    cfg = Config()
    cfg.estep.backend, cfg.estep.faiss_gpus = backend, devices
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    cfg.estep.faiss_gpus = [] if ngpu == 0 else [ngpu - 1]
    if backend != "torch":
        validate(cfg)
