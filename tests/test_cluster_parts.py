"""A checkpoint's cluster result in W parts: each rank writes its 1/W, any world size reads it."""

import pytest
import torch
from safetensors.torch import save_file

from pcl_scale.artifacts import CLUSTERS_FILE, TrainState, read_clusters, write_cluster_part
from pcl_scale.core.clusters import ClusterResult, random_clusters
from pcl_scale.engine.checkpoint import save_checkpoint
from pcl_scale.errors import UserError
from tests.fakes import FakeComm, run_ranks

N = 1001


def assert_same(a: ClusterResult, b: ClusterResult) -> None:
    for x, y in zip(a.clusterings, b.clusterings, strict=True):
        assert torch.equal(x.prototypes, y.prototypes) and torch.equal(x.phi, y.phi)
        assert torch.equal(x.assignments.int(), y.assignments)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_parts_read_back_whole_on_any_world_size(tmp_path, world):
    clusters = random_clusters(N, (7, 11), dim=5, seed=1)
    for rank in range(world):
        write_cluster_part(tmp_path, clusters, rank, world)
    parts = sorted(tmp_path.iterdir())
    assert len(parts) == world
    read = read_clusters(tmp_path)
    assert read is not None
    assert_same(clusters, read)


def test_a_missing_part_is_a_clear_error(tmp_path):
    clusters = random_clusters(N, (7,), dim=5)
    for rank in range(3):
        write_cluster_part(tmp_path, clusters, rank, 3)
    (tmp_path / "clusters-00001-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match=r"not 0\.\.1001 in 2 parts"):
        read_clusters(tmp_path)


def test_the_one_file_layout_still_reads(tmp_path):
    clusters = random_clusters(N, (7, 11), dim=5)
    save_file(clusters.state_dict(), str(tmp_path / CLUSTERS_FILE))
    read = read_clusters(tmp_path)
    assert read is not None
    assert_same(clusters, read)
    assert read_clusters(tmp_path / "nothing_here") is None


class StateWriter:
    """Stands in for Accelerate: writes one small file per rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        save_file({"w": torch.zeros(3)}, f"{path}/model_{self.rank}.safetensors")


def test_every_rank_writes_its_share_of_the_assignments(tmp_path):
    clusters = random_clusters(100_000, (50, 100, 200), dim=8)

    def save(comm: FakeComm) -> object:
        return save_checkpoint(StateWriter(comm.rank), tmp_path, TrainState(2, 40, 0),
                               clusters, 2, comm)  # fmt: skip

    final = run_ranks(2, save)[0]
    parts = sorted(final.glob("clusters-*"))
    assert [p.name for p in parts] == [
        "clusters-00000-of-00002.safetensors",
        "clusters-00001-of-00002.safetensors",
    ]
    sizes = [p.stat().st_size for p in parts]
    assigned = 3 * 100_000 * 4  # int32, three granularities
    assert all(0.45 * assigned < s < 0.55 * assigned + 20_000 for s in sizes)  # half each
    read = read_clusters(final)
    assert read is not None
    assert_same(clusters, read)
