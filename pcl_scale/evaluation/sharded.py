"""kNN and k-means scores with the features left on their ranks: no rank works alone on N rows.

kNN: every rank scores all queries (all-gathered in blocks) against its gallery shard; the per-query
top-k candidates go back to the query's own rank (all-to-all), which merges them and votes;
correct counts are all-reduced. k-means: the sharded k-means (K = classes), then a K x C
contingency table all-reduced, from which NMI, AMI, ARI and the matched accuracy follow. On one
process the same code runs with no-op collectives, so 1 and W processes give the same scores.
Neighbours are ordered by (similarity descending, gallery index ascending): ties are exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.core.kmeans import KMeansOptions, kmeans_sharded
from pcl_scale.distributed.comm import Comm

# The evaluation protocols' settings: weighted kNN (instance discrimination's) and majority kNN.
KNN_VOTES = (("knn200", 200, 0.07), ("knn5", 5, None))
KMEANS_SCORES = KMeansOptions(niter=100, nredo=10, init="kmeans++")


@dataclass(frozen=True)
class Shard:
    """This rank's rows of one split: features (n, D), global row index (n,), labels (n,).

    The scores run where the shard lives: put it on the accelerator (:meth:`to`) so that kNN and
    k-means run there, not on the host CPU while the GPUs idle.
    """

    feats: Tensor
    index: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Shard:
        return Shard(self.feats.to(device), self.index.to(device), self.labels.to(device))


def local_neighbours(
    queries: Tensor, gallery: Tensor, ids: Tensor, k: int, chunk: int = 1 << 14
) -> tuple[Tensor, Tensor]:
    """The k most similar gallery rows of each query: (m, k) similarities and gallery ids.

    Ordered by similarity, ties by the smaller id, exactly. ``ids`` (n,) must be ascending. The
    gallery is scored in chunks of ``chunk`` rows (never an m x n matrix); missing rows (a gallery
    smaller than k) are padding with similarity -inf and id -1.
    """
    sims = queries.new_full((queries.shape[0], k), float("-inf"))
    out_ids = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
    for start in range(0, gallery.shape[0], chunk):
        part_sims, part_ids = _chunk_neighbours(
            queries, gallery[start : start + chunk], ids[start : start + chunk], k
        )
        order = merge_order(torch.cat([sims, part_sims], 1), torch.cat([out_ids, part_ids], 1), k)
        sims = torch.cat([sims, part_sims], 1).gather(1, order)
        out_ids = torch.cat([out_ids, part_ids], 1).gather(1, order)
    return sims, out_ids


def _chunk_neighbours(
    queries: Tensor, gallery: Tensor, ids: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Exact top-min(k, n) of one gallery chunk, the ties at the k-th place by the smaller id."""
    scores = queries @ gallery.t()  # (m, n)
    kk = min(k, gallery.shape[0])
    boundary = scores.topk(kk, dim=1).values[:, -1:]  # (m, 1) the kk-th similarity
    above = scores > boundary
    at = scores == boundary
    room = kk - above.sum(1, keepdim=True)  # how many of the tied rows are kept
    keep = above | (at & (torch.cumsum(at, 1, dtype=torch.int32) <= room))  # exactly kk per row
    pos = keep.nonzero()[:, 1].view(-1, kk)  # ascending positions, so ascending ids
    sims = scores.gather(1, pos)
    order = sims.argsort(dim=1, descending=True, stable=True)  # ties keep the id order
    return sims.gather(1, order), ids[pos.gather(1, order)]


def merge_order(sims: Tensor, ids: Tensor, k: int) -> Tensor:
    """Columns (m, k) of the k best candidates of (m, c), by similarity then id (c >= k)."""
    by_id = ids.argsort(dim=1, stable=True)
    by_sim = sims.gather(1, by_id).argsort(dim=1, descending=True, stable=True)[:, :k]
    return by_id.gather(1, by_sim)


def knn_votes(sims: Tensor, labels: Tensor, num_classes: int, temperature: float | None) -> Tensor:
    """Class scores (m, C) from ordered neighbours (m, k) and their labels.

    With ``temperature`` each neighbour votes ``exp(s / T)``; without, each votes 1 and a tie
    between classes goes to the class of the nearest voter among them. Padding (label -1) votes
    for nothing.
    """
    k = sims.shape[1]
    valid = labels >= 0
    votes = labels.clamp_min(0)
    zeros = sims.new_zeros(votes.shape[0], num_classes, dtype=torch.float32)
    if temperature is not None:
        weights = torch.where(valid, (sims / temperature).exp(), 0.0).float()
        return zeros.scatter_add_(1, votes, weights)
    ones = valid.float()
    counts = zeros.scatter_add_(1, votes, ones)
    rank_bonus = k - torch.arange(k, dtype=torch.float32, device=sims.device)
    bonus = rank_bonus.expand_as(ones) / (k * k + 1.0) * ones
    return counts + torch.zeros_like(counts).scatter_reduce_(1, votes, bonus, reduce="amax")


def sharded_neighbours(
    gallery: Shard, queries: Tensor, k: int, comm: Comm, rows_per_round: int = 1024
) -> tuple[Tensor, Tensor]:
    """(m, k) similarities and gallery labels of this rank's ``queries`` (m, D) over all shards.

    Each round every rank contributes the same number of query rows (padded), all ranks score
    them against their shard, and each query's candidates return to its rank to be merged: every
    rank runs the same collectives, and each moves O(queries x k) in all.
    """
    w, d = comm.world_size, queries.shape[1]
    block = max(1, rows_per_round // w)
    rounds = -(-comm.max_over_ranks(queries.shape[0]) // block)
    g = F.normalize(gallery.feats.float(), dim=1)
    q_all = F.normalize(queries.float(), dim=1)
    out_sims, out_labels = [], []
    for r in range(rounds):
        mine = q_all[r * block : (r + 1) * block]
        padded = torch.cat([mine, mine.new_zeros(block - mine.shape[0], d)])
        sims, ids = local_neighbours(comm.all_gather_cat(padded), g, gallery.index, k)
        labels = torch.where(ids >= 0, gallery.labels[_positions(ids, gallery.index)], -1)
        cands = [
            comm.all_to_all(t).view(w, block, k).permute(1, 0, 2).reshape(block, w * k)
            for t in (sims, ids, labels)
        ]  # (block, W k): every rank's candidates, fmt: skip
        order = merge_order(cands[0], cands[1], k)
        out_sims.append(cands[0].gather(1, order)[: mine.shape[0]])
        out_labels.append(cands[2].gather(1, order)[: mine.shape[0]])
    if not out_sims:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(out_sims), torch.cat(out_labels)


def sharded_knn_scores(
    gallery: Shard,
    queries: Shard,
    num_classes: int,
    comm: Comm,
    votes: tuple[tuple[str, int, float | None], ...] = KNN_VOTES,
) -> dict[str, float]:
    """Top-1 and top-5 (%) of each kNN of ``votes`` (name, k, temperature or None for majority):
    by default weighted kNN (k = 200, T = 0.07) and majority kNN (k = 5)."""
    n_queries = int(comm.all_reduce_sum(torch.tensor([float(queries.feats.shape[0])]))[0])
    sims, labels = sharded_neighbours(gallery, queries.feats, max(k for _, k, _ in votes), comm)
    row = {}
    for name, k, temperature in votes:
        scores = knn_votes(sims[:, :k], labels[:, :k], num_classes, temperature)
        ranked = scores.argsort(dim=1, descending=True)
        hits = ranked == queries.labels[:, None]
        counts = torch.tensor(
            [float(hits[:, : min(top, num_classes)].any(1).sum()) for top in (1, 5)],
            dtype=torch.float64,
        )
        counts = comm.all_reduce_sum(counts)
        row[f"{name}_top1"] = 100.0 * float(counts[0]) / max(n_queries, 1)
        row[f"{name}_top5"] = 100.0 * float(counts[1]) / max(n_queries, 1)
    return row


def sharded_kmeans_scores(
    shards: list[Shard],
    sizes: list[int],
    num_clusters: int,
    comm: Comm,
    seed: int = 0,
    options: KMeansOptions = KMEANS_SCORES,
) -> dict[str, float]:
    """k-means (K = ``num_clusters``) over the splits together, sharded; NMI, AMI, ARI, acc (%).

    ``sizes`` are the splits' global row counts: split s's rows follow those of the splits before.
    The k-means++ seeding draws from a sample of 8 K rows, so no rank runs K passes over N.
    """
    joined = concat_splits(shards, sizes)
    x, index, labels = joined.feats, joined.index, joined.labels.long().cpu()
    num_classes = comm.max_over_ranks(int(labels.max()) + 1 if labels.numel() else 0)
    seeded = dataclasses.replace(options, seed=seed)
    res = kmeans_sharded(x, index, sum(sizes), num_clusters, comm.all_reduce_sum, seeded)
    cells = res.assignments.long().cpu() * num_classes + labels
    table = torch.bincount(cells, minlength=num_clusters * num_classes).double()
    table = comm.all_reduce_sum(table).view(num_clusters, num_classes)  # (clusters, classes)
    return scores_from_contingency(table.numpy())


def concat_splits(shards: list[Shard], sizes: list[int]) -> Shard:
    """This rank's rows of several splits as one, split s's global indices after the earlier
    splits' ``sizes``."""
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    return Shard(
        torch.cat([s.feats.float() for s in shards]),
        torch.cat([s.index + off for s, off in zip(shards, offsets, strict=True)]),
        torch.cat([s.labels for s in shards]),
    )


def scores_from_contingency(table: np.ndarray) -> dict[str, float]:
    """NMI, AMI (arithmetic normalisation, as scikit-learn), ARI and matched accuracy (%) from a
    (clusters, classes) count table: the scores of the labelings it counts."""
    from scipy.optimize import linear_sum_assignment
    from scipy.special import comb
    from sklearn.metrics import mutual_info_score
    from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information

    table = table[table.sum(1) > 0][:, table.sum(0) > 0]  # only the ids that occur
    n = float(table.sum())
    rows, cols = table.sum(1), table.sum(0)
    rows_idx, cols_idx = linear_sum_assignment(table, maximize=True)
    acc = 100.0 * float(table[rows_idx, cols_idx].sum()) / n
    if table.shape[0] == table.shape[1] == 1 or table.shape[0] == table.shape[1] == n:
        return {"nmi": 1.0, "ami": 1.0, "ari": 1.0, "acc": acc}
    counts = np.rint(table).astype(np.int64)
    mi = float(mutual_info_score(None, None, contingency=counts))

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0] / n
        return float(-(p * np.log(p)).sum())

    mean_h = (entropy(rows) + entropy(cols)) / 2
    emi = float(expected_mutual_information(counts, int(n)))
    nmi = mi / mean_h if mean_h > 0 else 1.0
    denom = mean_h - emi
    ami = (mi - emi) / (denom if abs(denom) > np.finfo(float).eps else np.finfo(float).eps)
    pairs = float(comb(table, 2).sum())
    a, b = float(comb(rows, 2).sum()), float(comb(cols, 2).sum())
    expected = a * b / float(comb(n, 2))
    ari = (pairs - expected) / ((a + b) / 2 - expected) if (a + b) / 2 != expected else 1.0
    return {"nmi": float(nmi), "ami": float(ami), "ari": float(ari), "acc": acc}


def _positions(ids: Tensor, index: Tensor) -> Tensor:
    """Local positions of gallery ids (valid ones; -1 maps to 0 and is masked by the caller)."""
    return torch.searchsorted(index, ids.clamp_min(0)).clamp_max(max(index.numel() - 1, 0))
