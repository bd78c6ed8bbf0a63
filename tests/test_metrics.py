"""Evaluation metrics against slow references written here and hand-computed values."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcl_scale.evaluation.metrics import (
    clustering_scores,
    hungarian_accuracy,
    knn_class_scores,
    knn_scores,
    topk_accuracy,
)


def slow_knn(train, train_labels, test, k, temperature, num_classes):
    out = torch.zeros(len(test), num_classes)
    for i, row in enumerate(test):
        sims = [float(F.cosine_similarity(row, t, dim=0)) for t in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        for j in order:
            c = int(train_labels[j])
            if temperature is None:
                out[i, c] += 1.0
            else:
                out[i, c] += float(np.exp(sims[j] / temperature))
        if temperature is None:  # tie-break: the class of the nearest voter wins
            best = out[i].max()
            tied = [c for c in range(num_classes) if out[i, c] == best]
            winner = next(int(train_labels[j]) for j in order if int(train_labels[j]) in tied)
            out[i, winner] += 0.5
    return out


@pytest.mark.parametrize("temperature", [0.07, None])
def test_knn_matches_a_slow_reference(temperature):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(4, (60,), generator=g)
    fast = knn_class_scores(train, labels, test, 7, temperature, 4, chunk=10)
    slow = slow_knn(train, labels, test, 7, temperature, 4)
    if temperature is None:  # compare the decisions (the tie-break bonus differs in size)
        assert torch.equal(fast.argmax(1), slow.argmax(1))
        assert torch.equal(fast.floor(), (slow - 0.5 * (slow % 1 > 0)).floor())
    else:
        assert torch.allclose(fast, slow, rtol=1e-5)


def test_majority_tie_goes_to_the_nearest_voter():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 0])  # votes 2 vs 2; the nearest to the query is class 0
    scores = knn_class_scores(train, labels, torch.tensor([[1.0, 0.05]]), 4, None, 2)
    assert int(scores.argmax()) == 0


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)
    assert acc[5] == pytest.approx(100.0)


def test_knn_scores_are_perfect_on_separated_classes():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(6, 16, generator=g), dim=1) * 10
    labels = torch.arange(6).repeat_interleave(40)
    feats = centres[labels] + 0.1 * torch.randn(240, 16, generator=g)
    row = knn_scores(feats[::2], labels[::2], feats[1::2], labels[1::2])
    assert row == {
        "knn200_top1": 100.0,
        "knn200_top5": 100.0,
        "knn5_top1": 100.0,
        "knn5_top5": 100.0,
    }


def test_hungarian_accuracy_is_100_for_a_relabelling_and_matches_brute_force():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 200)
    perm = np.array([2, 0, 3, 1])
    assert hungarian_accuracy(true, perm[true] + 7) == 100.0
    pred = rng.integers(0, 4, 200)
    brute = max(
        100.0 * np.mean(np.array(p)[pred] == true) for p in itertools.permutations(range(4))
    )
    assert hungarian_accuracy(true, pred) == pytest.approx(brute)


def test_hungarian_accuracy_with_more_clusters_than_classes():
    true = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 2, 2, 2])  # best matching: 0->0 (2 right), 2->1 (3 right)
    assert hungarian_accuracy(true, pred) == pytest.approx(500 / 6)


def test_clustering_scores_agree_with_sklearn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(1)
    true, pred = rng.integers(0, 5, 300), rng.integers(0, 7, 300)
    row = clustering_scores(true, pred)
    assert row["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred))
    assert row["ari"] == pytest.approx(adjusted_rand_score(true, pred))
    assert clustering_scores(true, true) == pytest.approx(
        {"nmi": 1.0, "ami": 1.0, "ari": 1.0, "acc": 100.0}
    )


def test_linear_probe_picks_weight_decay_on_validation_only():
    from pcl_scale.evaluation.linear_probe import _split_validation, linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 20, generator=g) * 3
    labels = torch.arange(5).repeat_interleave(40)
    feats = centres[labels] + torch.randn(200, 20, generator=g)
    test_labels = torch.arange(5).repeat_interleave(20)
    test = centres[test_labels] + torch.randn(100, 20, generator=g)
    row = linear_probe(feats, labels, test, test_labels, seed=0)
    assert row["top1"] > 95.0 and row["top5"] == 100.0
    scrambled = linear_probe(feats, labels, test, test_labels.roll(20), seed=0)
    assert scrambled["weight_decay"] == row["weight_decay"]  # test labels never used to choose
    assert scrambled["top1"] < 30.0
    tr, va = _split_validation(labels, 0.2, 0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 200
    assert torch.bincount(labels[va]).tolist() == [8] * 5  # stratified


def test_reference_linear_schedule_is_the_spec():
    from pcl_scale.evaluation.linear_probe import _reference_lr, reference_schedule

    s = reference_schedule()
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size, s.epochs) == (5.0, 0.9, 0.0, 256, 100)
    lrs = [_reference_lr(s, e) for e in range(100)]
    assert lrs[59] == 5.0 and lrs[60] == pytest.approx(0.5) and lrs[80] == pytest.approx(0.05)


def slow_purity(true, pred):
    hits = 0
    for cluster in set(pred.tolist()):
        members = [t for t, p in zip(true.tolist(), pred.tolist(), strict=True) if p == cluster]
        hits += max(members.count(c) for c in set(members))
    return 100.0 * hits / len(true)


def test_prototype_scores_report_purity_when_clusters_outnumber_classes(monkeypatch):
    import pcl_scale.evaluation.metrics as metrics_module

    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 2000)
    pred = np.where(
        rng.random(2000) < 0.7, true * 8 + rng.integers(0, 8, 2000), rng.integers(0, 40, 2000)
    )
    few = metrics_module.prototype_scores_of(true, true % 3)  # K = 3 <= C = 5: matched accuracy
    assert few == pytest.approx(clustering_scores(true, true % 3))
    many = metrics_module.prototype_scores_of(true, pred)  # K = 40 > C = 5
    ref = clustering_scores(true, pred)
    assert {k: many[k] for k in ("nmi", "ami", "ari")} == pytest.approx(
        {k: ref[k] for k in ("nmi", "ami", "ari")}
    )
    assert "acc" not in many and many["purity"] == pytest.approx(slow_purity(true, pred))
    monkeypatch.setattr(metrics_module, "MAX_EMI_STEPS", 1e3)
    bounded = metrics_module.prototype_scores_of(true, pred)
    assert "ami" not in bounded and "steps > 1e+03" in str(bounded["ami_skipped"])
