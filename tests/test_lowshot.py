"""Low-shot SVM protocol: samplers, cost selection off the test split, AP, end-to-end scores."""

import numpy as np
import pytest

from pcl_scale.evaluation.lowshot import (
    lowshot_svm,
    sample_per_class,
    sample_positives_per_class,
    voc_average_precision,
)


def blobs(n_per_class=30, classes=5, dim=16, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_sampler_draws_exactly_k_per_class_reproducibly():
    _, labels = blobs()
    for k in (1, 2, 4, 8, 16):
        idx = sample_per_class(labels, k, seed=3)
        assert len(np.unique(idx)) == len(idx)
        assert np.bincount(labels[idx]).tolist() == [k] * 5
        assert np.array_equal(idx, sample_per_class(labels, k, seed=3))
    assert not np.array_equal(sample_per_class(labels, 4, 0), sample_per_class(labels, 4, 1))
    with pytest.raises(ValueError, match=r"k=31 .* fewer"):
        sample_per_class(labels, 31, 0)


def test_multilabel_sampler_gives_every_class_k_positives_without_repeats():
    rng = np.random.default_rng(0)
    targets = rng.choice([1, -1, -1, 0], size=(200, 6))
    idx = sample_positives_per_class(targets, 4, seed=1)
    assert len(np.unique(idx)) == len(idx)
    assert ((targets[idx] == 1).sum(0) >= 4).all()
    assert np.array_equal(idx, sample_positives_per_class(targets, 4, seed=1))


def test_voc_average_precision_ignores_difficult_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    targets = np.array([1, -1, 1, 0])  # ranking without the difficult one: +, -, +
    assert voc_average_precision(scores, targets) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_lowshot_single_label_scores_and_costs_are_chosen_off_the_test_split():
    x, y = blobs(seed=0)
    xt, yt = blobs(n_per_class=20, seed=0)  # same centres, new draws
    results = lowshot_svm(x, y, xt, yt, ks=(1, 4), runs=3, seed=0)
    assert [r.k for r in results] == [1, 4]
    assert all(len(r.runs) == 3 and r.std >= 0 for r in results)
    assert results[0].costs == (0.5, 0.5, 0.5)  # k = 1: no cross-validation possible
    assert results[1].mean > 95.0
    shuffled = lowshot_svm(x, y, xt, np.random.default_rng(0).permutation(yt), ks=(4,), runs=3)
    assert shuffled[0].costs == results[1].costs  # the test labels never influence the choice
    assert shuffled[0].mean < 60.0


def test_lowshot_multilabel_map():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))

    def make(n):
        targets = np.where(rng.random((n, 4)) < 0.3, 1, -1)
        targets[rng.random((n, 4)) < 0.05] = 0  # a few difficult ones
        feats = (targets == 1) @ centres + 0.2 * rng.normal(size=(n, 32))
        return feats, targets

    (x, t), (xt, tt) = make(300), make(200)
    results = lowshot_svm(x, t, xt, tt, ks=(8,), runs=2)
    assert results[0].mean > 90.0
