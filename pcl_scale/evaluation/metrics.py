"""Representation quality on labelled data: kNN, clustering scores (NMI, AMI, ARI, accuracy)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.distributed.comm import Comm
from pcl_scale.evaluation.sharded import (
    Shard,
    knn_votes,
    local_neighbours,
    sharded_kmeans_scores,
)


def knn_class_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int,
    temperature: float | None = None,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Class scores (M, C) of a cosine k-nearest-neighbour classifier (one process).

    With ``temperature`` each of the k neighbours votes ``exp(similarity / T)`` for its class
    (the weighted kNN of instance discrimination: k = 200, T = 0.07); without, each votes 1 and
    ties between classes go to the class of the nearest voter among them. Neighbours are the
    sharded evaluation's (:func:`pcl_scale.evaluation.sharded.local_neighbours`), in chunks of
    ``chunk`` test rows: the full test x train matrix is never held.
    """
    a = F.normalize(train_feats.float(), dim=1)
    b = F.normalize(test_feats.float(), dim=1)
    c = num_classes or int(train_labels.max()) + 1
    k = min(k, a.shape[0])
    ids = torch.arange(a.shape[0])
    out = []
    for start in range(0, b.shape[0], chunk):
        sims, nearest = local_neighbours(b[start : start + chunk], a, ids, k)  # (m, k)
        out.append(knn_votes(sims, train_labels[nearest], c, temperature))
    return torch.cat(out) if out else torch.empty(0, c)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (%) of class scores (M, C) for each k in ``ks`` (k capped at C)."""
    ranked = scores.argsort(dim=1, descending=True)
    hit = ranked == labels[:, None]
    return {k: 100.0 * float(hit[:, : min(k, scores.shape[1])].any(1).float().mean()) for k in ks}


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 5,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (%) of a k-nearest-neighbour majority vote under cosine similarity."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_class_scores(train_feats, train_labels, test_feats, k, None, num_classes, chunk)
    return topk_accuracy(scores, test_labels, (1,))[1]


def knn_scores(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor
) -> dict[str, float]:
    """Weighted kNN (k = 200, T = 0.07) and majority kNN (k = 5), top-1 and top-5 (%)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    row = {}
    for name, k, t in (("knn200", 200, 0.07), ("knn5", 5, None)):
        scores = knn_class_scores(train_feats, train_labels, test_feats, k, t, num_classes)
        acc = topk_accuracy(scores, test_labels, (1, 5))
        row[f"{name}_top1"], row[f"{name}_top5"] = acc[1], acc[5]
    return row


def hungarian_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy (%) of cluster ids against labels under the best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    t_ids, t = np.unique(true, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    table = np.zeros((len(p_ids), len(t_ids)), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return 100.0 * float(table[rows, cols].sum()) / len(true)


def clustering_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMI, AMI, ARI and Hungarian-matched accuracy (%) of cluster ids against labels."""
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )

    return {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ami": float(adjusted_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
        "acc": hungarian_accuracy(true, pred),
    }


# Above this many inner steps, the expected mutual information of AMI (scikit-learn's, about
# K x C x min(N/K, N/C) steps) is skipped: hours at 100M images and K = 100k.
MAX_EMI_STEPS = 2e9


def prototype_scores_of(true: np.ndarray, pred: np.ndarray) -> dict[str, float | str]:
    """Scores of K prototype assignments against C classes, for any K (up to 10^5 and more).

    NMI and ARI come from scikit-learn's sparse contingency (O(N log N)). With K <= C the matched
    accuracy is the Hungarian one; with K > C a one-to-one matching leaves most clusters out, so
    ``purity`` (each cluster votes for its majority class) is reported instead, from the sparse
    table. AMI is skipped, with the reason, when its expected mutual information would take more
    than ``MAX_EMI_STEPS`` steps.
    """
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )
    from sklearn.metrics.cluster import contingency_matrix

    n, k, c = len(true), len(np.unique(pred)), len(np.unique(true))
    row: dict[str, float | str] = {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
    }
    steps = k * c * min(n / k, n / c)
    if steps <= MAX_EMI_STEPS:
        row["ami"] = float(adjusted_mutual_info_score(true, pred))
    else:
        row["ami_skipped"] = f"K x C x min(N/K, N/C) = {steps:.1e} steps > {MAX_EMI_STEPS:.0e}"
    if k <= c:
        row["acc"] = hungarian_accuracy(true, pred)
    else:
        table = contingency_matrix(pred, true, sparse=True)  # (clusters, classes)
        row["purity"] = 100.0 * float(table.max(axis=1).sum()) / n
    return row


def kmeans_scores(feats: Tensor, labels: Tensor, seed: int = 0) -> dict[str, float]:
    """k-means with K = number of classes, then clustering scores: the sharded evaluation's
    k-means and scores (:func:`pcl_scale.evaluation.sharded.sharded_kmeans_scores`) on one
    process, so a one-process score equals a sharded one."""
    k = int(labels.unique().numel())
    whole = Shard(feats, torch.arange(feats.shape[0]), labels)
    return sharded_kmeans_scores([whole], [feats.shape[0]], k, Comm(), seed)


def representation_scores(
    feats: list[Tensor], labels: list[Tensor], k: int = 5, seed: int = 0
) -> dict[str, float]:
    """k-means NMI/AMI on all splits together, and kNN top-1 (%) when there are two splits.

    Args:
        feats: (N_i, F) features per split: [gallery] or [gallery, queries].
        labels: (N_i,) labels per split.
    """
    row = kmeans_scores(torch.cat(feats), torch.cat(labels), seed=seed)
    if len(feats) > 1:
        row["knn_top1"] = knn_accuracy(feats[0], labels[0], feats[1], labels[1], k=k)
    return row
