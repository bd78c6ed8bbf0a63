"""Sharded kNN and k-means scores: W fake ranks against one process and slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcl_scale.distributed.comm import Comm
from pcl_scale.evaluation.metrics import clustering_scores
from pcl_scale.evaluation.sharded import (
    Shard,
    local_neighbours,
    scores_from_contingency,
    sharded_kmeans_scores,
    sharded_knn_scores,
    sharded_neighbours,
)

from .fakes import run_ranks


def tied_vectors(n: int, seed: int) -> torch.Tensor:
    """Unit vectors of +-0.5 in D = 4: every dot product is a multiple of 1/4, exact, and tied."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, 4), generator=g).float() - 0.5) * 1.0


def shard(x: torch.Tensor, labels: torch.Tensor, rank: int, world: int) -> Shard:
    index = torch.arange(rank, len(x), world)
    return Shard(x[index], index, labels[index])


def slow_top_ids(q: torch.Tensor, gallery: torch.Tensor, k: int) -> list[list[int]]:
    """Sort every gallery row by (similarity descending, id ascending), in Python."""
    out = []
    for row in q:
        sims = [float(row @ g) for g in gallery]
        out.append(sorted(range(len(gallery)), key=lambda i: (-sims[i], i))[:k])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_merged_top_k_is_the_unsharded_top_k_ties_included(world):
    gallery, queries = tied_vectors(101, seed=0), tied_vectors(23, seed=1)
    labels = torch.arange(101)  # each row its own label: the labels show the ids
    reference = slow_top_ids(queries, gallery, 10)

    def rank_main(comm):
        q = shard(queries, torch.zeros(23, dtype=torch.long), comm.rank, world)
        _, got_labels = sharded_neighbours(shard(gallery, labels, comm.rank, world), q.feats,
                                              10, comm, rows_per_round=8)  # fmt: skip
        return q.index, got_labels

    for index, got_labels in run_ranks(world, rank_main):
        expected = torch.tensor([[int(labels[i]) for i in reference[j]] for j in index.tolist()])
        assert torch.equal(got_labels, expected.reshape(got_labels.shape))
    _, ids = local_neighbours(queries, gallery, torch.arange(101), 10, chunk=17)
    assert ids.tolist() == reference  # gallery chunks merge to the same exact order


def test_a_gallery_smaller_than_k_is_padded():
    sims, ids = local_neighbours(tied_vectors(3, 0), tied_vectors(4, 1), torch.arange(4), 6)
    assert ids.shape == (3, 6) and bool((ids[:, 4:] == -1).all())
    assert bool(torch.isinf(sims[:, 4:]).all())


def slow_knn_top1(gallery, g_labels, queries, q_labels, k):
    """Majority vote of the k nearest (ties between classes: the nearest voter's class)."""
    hits = 0
    for row, label in zip(queries, q_labels.tolist(), strict=True):
        sims = [float(row @ g) for g in torch.nn.functional.normalize(gallery, dim=1)]
        top = sorted(range(len(gallery)), key=lambda i: (-sims[i], i))[:k]
        votes: dict[int, int] = {}
        for i in top:
            votes[int(g_labels[i])] = votes.get(int(g_labels[i]), 0) + 1
        best = max(votes.values())
        winner = next(int(g_labels[i]) for i in top if votes[int(g_labels[i])] == best)
        hits += winner == label
    return 100.0 * hits / len(queries)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_knn_equals_one_process_and_the_slow_reference(world):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    g_labels, q_labels = torch.arange(300) % 5, torch.arange(61) % 5
    gallery = centres[g_labels] + 1.5 * torch.randn(300, 16, generator=g)
    queries = centres[q_labels] + 1.5 * torch.randn(61, 16, generator=g)
    queries_n = torch.nn.functional.normalize(queries, dim=1)
    one = sharded_knn_scores(Shard(gallery, torch.arange(300), g_labels),
                             Shard(queries, torch.arange(61), q_labels), 5, Comm())  # fmt: skip

    def rank_main(comm):
        return sharded_knn_scores(shard(gallery, g_labels, comm.rank, world),
                                  shard(queries, q_labels, comm.rank, world), 5, comm)  # fmt: skip

    for row in run_ranks(world, rank_main):
        assert row == one
    assert one["knn5_top1"] == pytest.approx(
        slow_knn_top1(gallery, g_labels, queries_n, q_labels, 5)
    )
    assert set(one) == {"knn200_top1", "knn200_top5", "knn5_top1", "knn5_top5"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_from_the_contingency_table_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 6, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 8, 500))
    table = np.zeros((8, 6))
    np.add.at(table, (pred, true), 1)
    got, ref = scores_from_contingency(table), clustering_scores(true, pred)
    for key in ("nmi", "ami", "ari", "acc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_sharded_kmeans_scores_equal_one_process():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 8, generator=g)
    labels = [torch.arange(200) % 4, torch.arange(50) % 4]
    splits = [centres[lab] + 0.8 * torch.randn(len(lab), 8, generator=g) for lab in labels]
    one = sharded_kmeans_scores([Shard(x, torch.arange(len(x)), lab)
                                 for x, lab in zip(splits, labels, strict=True)],
                                [200, 50], 4, Comm(), seed=1)  # fmt: skip

    def rank_main(comm):
        shards = [shard(x, lab, comm.rank, 2) for x, lab in zip(splits, labels, strict=True)]
        return sharded_kmeans_scores(shards, [200, 50], 4, comm, seed=1)

    for row in run_ranks(2, rank_main):
        assert row == pytest.approx(one, abs=1e-9)
    assert one["nmi"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shards_on_cuda_score_as_on_the_cpu():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(5, 32, generator=g)
    g_labels, q_labels = torch.arange(3000) % 5, torch.arange(400) % 5
    gallery = Shard(centres[g_labels] + torch.randn(3000, 32, generator=g), torch.arange(3000),
                    g_labels)  # fmt: skip
    queries = Shard(centres[q_labels] + torch.randn(400, 32, generator=g), torch.arange(400),
                    q_labels)  # fmt: skip
    on_cpu = sharded_knn_scores(gallery, queries, 5, Comm())
    on_gpu = sharded_knn_scores(gallery.to("cuda"), queries.to("cuda"), 5, Comm())
    assert on_gpu == pytest.approx(on_cpu, abs=0.3)  # one query of 400 may flip on a near tie
    kmeans_cpu = sharded_kmeans_scores([gallery, queries], [3000, 400], 5, Comm(), seed=1)
    kmeans_gpu = sharded_kmeans_scores([gallery.to("cuda"), queries.to("cuda")], [3000, 400], 5,
                                       Comm(), seed=1)  # fmt: skip
    assert kmeans_gpu == pytest.approx(kmeans_cpu, abs=0.02)
