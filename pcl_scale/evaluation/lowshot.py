"""Low-shot linear SVMs on frozen features (PCL_SPEC 2.2), single-label and multi-label (VOC).

For each k in {1, 2, 4, 8, 16} and each of 5 seeded runs, k training images per class are drawn,
one ``LinearSVC`` per class is trained on the L2-normalised features (squared hinge, l2, as the
reference), and the test split is scored: accuracy for single-label data, mAP for multi-label.
The reported figure is the mean and standard deviation over the runs.

The cost C is chosen by cross-validation on the drawn training images only, never on the test
split (the reference takes the best cost on test). With one image per class no fold can hold a
class out and still learn it, so k = 1 uses ``default_cost`` (0.5, the reference's default).

Multi-label targets are an (N, C) array with 1 = positive, -1 = negative and 0 = "difficult"
(VOC). Difficult images are left out of a class's training set and out of its AP, as in the
standard VOC protocol (the reference counts them as negatives). An image drawn for two classes
is used once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_COSTS = (0.01, 0.1, 0.5, 1.0, 10.0)


@dataclass(frozen=True)
class LowShotResult:
    """Mean and standard deviation (over runs) of the test score, per k; the costs chosen."""

    k: int
    mean: float
    std: float
    runs: tuple[float, ...]
    costs: tuple[float, ...]


def sample_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of exactly k images of every class, drawn without replacement (sorted)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if (counts < k).any():
        short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < k}
        raise ValueError(f"k={k} images per class asked, but classes {short} have fewer")
    picks = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def sample_positives_per_class(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Multi-label: k images positive (1) for every class, each image at most once (sorted)."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for c in range(targets.shape[1]):
        pos = np.flatnonzero(targets[:, c] == 1)
        if len(pos) < k:
            raise ValueError(f"k={k} positives asked, but class {c} has {len(pos)}")
        chosen.update(int(i) for i in rng.choice(pos, size=k, replace=False))
    return np.array(sorted(chosen))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def _svm(cost: float, class_weight: dict[int, float] | None = None) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(
        C=cost, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4, max_iter=2000,
        class_weight=class_weight,
    )  # fmt: skip


def voc_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class over non-difficult images (targets 1 / -1; 0 is ignored)."""
    from sklearn.metrics import average_precision_score

    keep = targets != 0
    if not (targets[keep] == 1).any():
        return float("nan")
    return float(average_precision_score(targets[keep] == 1, scores[keep]))


def _fit(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def accuracy_score(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, cost: float
) -> float:
    """Single-label: one-vs-rest LinearSVC on (x, y), accuracy (%) on the test rows."""
    pred = _fit(_svm(cost), x, y).predict(x_test)
    return 100.0 * float((pred == y_test).mean())


def map_score(
    x: np.ndarray, t: np.ndarray, x_test: np.ndarray, t_test: np.ndarray, cost: float
) -> float:
    """Multi-label: one LinearSVC per class (difficult rows left out), mAP (%) on the test rows."""
    aps = []
    for c in range(t.shape[1]):
        keep = t[:, c] != 0
        if len(np.unique(t[keep, c])) < 2:  # a fold without positives (or negatives)
            scores = np.zeros(len(x_test))
        else:
            model = _fit(_svm(cost, class_weight={1: 2.0, -1: 1.0}), x[keep], t[keep, c])
            scores = model.decision_function(x_test)
        aps.append(voc_average_precision(scores, t_test[:, c]))
    return 100.0 * float(np.nanmean(aps))


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], float]


def choose_cost(
    x: np.ndarray,
    t: np.ndarray,
    k: int,
    costs: Sequence[float],
    default: float,
    seed: int,
    score: Scorer,
) -> float:
    """The cost with the best mean score over folds of the drawn training images alone.

    Folds are stratified by class for single-label targets; with k < 2 no fold could hold a
    class out and still learn it, so ``default`` is returned.
    """
    if k < 2 or len(costs) == 1:
        return default
    from sklearn.model_selection import KFold, StratifiedKFold

    n_splits = min(k, 3)
    if t.ndim == 1:
        folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, t))
    else:
        folds = list(KFold(n_splits, shuffle=True, random_state=seed).split(x))
    best, best_score = default, -1.0
    for cost in costs:
        mean = float(np.nanmean([score(x[tr], t[tr], x[va], t[va], cost) for tr, va in folds]))
        if mean > best_score:
            best, best_score = cost, mean
    return best


def lowshot_svm(
    train_feats: np.ndarray,
    train_targets: np.ndarray,
    test_feats: np.ndarray,
    test_targets: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    runs: int = 5,
    costs: Sequence[float] = DEFAULT_COSTS,
    default_cost: float = 0.5,
    seed: int = 0,
) -> list[LowShotResult]:
    """Low-shot SVM scores per k: accuracy (%) for (N,) labels, mAP (%) for (N, C) targets."""
    x_train, x_test = _normalise(train_feats), _normalise(test_feats)
    train_targets = np.asarray(train_targets)
    multi = train_targets.ndim == 2
    score = map_score if multi else accuracy_score
    out = []
    for k in ks:
        scores, chosen = [], []
        for run in range(runs):
            run_seed = seed * 1000 + run
            sample = sample_positives_per_class if multi else sample_per_class
            idx = sample(train_targets, k, run_seed)
            x, t = x_train[idx], train_targets[idx]
            cost = choose_cost(x, t, k, costs, default_cost, run_seed, score)
            scores.append(score(x, t, x_test, test_targets, cost))
            chosen.append(cost)
        out.append(
            LowShotResult(
                k, float(np.mean(scores)), float(np.std(scores)), tuple(scores), tuple(chosen)
            )
        )
    return out
