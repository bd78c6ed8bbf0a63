"""Representation quality on labelled data: kNN accuracy and k-means NMI/AMI."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.kmeans import kmeans


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 5,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (%) of a k-nearest-neighbour majority vote under cosine similarity.

    Ties between classes go to the class of the nearest voter among them. Similarities are
    computed in chunks of test rows, so the full test x train matrix is never held.
    """
    a = F.normalize(train_feats.float(), dim=1)
    b = F.normalize(test_feats.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, a.shape[0])
    correct = 0
    for start in range(0, b.shape[0], chunk):
        sims = b[start : start + chunk] @ a.t()  # (c, N_train)
        top_idx = sims.topk(k, dim=1).indices  # (c, k), nearest first
        votes = train_labels[top_idx]  # (c, k)
        counts = F.one_hot(votes, num_classes).sum(1).float()  # (c, C)
        # break ties by rank: a tiny bonus for the nearest voter of each class
        rank_bonus = torch.zeros_like(counts).scatter_reduce_(
            1,
            votes,
            (k - torch.arange(k, dtype=torch.float32)).expand_as(votes) / (k * k + 1.0),
            reduce="amax",
        )
        pred = (counts + rank_bonus).argmax(1)
        correct += int((pred == test_labels[start : start + chunk]).sum())
    return 100.0 * correct / b.shape[0]


def kmeans_scores(feats: Tensor, labels: Tensor, seed: int = 0) -> dict[str, float]:
    """k-means with K = number of classes (k-means++, 10 restarts), then NMI and AMI."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    k = int(labels.unique().numel())
    res = kmeans(feats.float(), k, niter=100, nredo=10, seed=seed, init="kmeans++")
    pred, true = res.assignments.cpu().numpy(), labels.cpu().numpy()
    return {
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ami": float(adjusted_mutual_info_score(true, pred)),
    }


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
