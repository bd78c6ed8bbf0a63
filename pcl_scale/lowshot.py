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

from collections.abc import Sequence
from dataclasses import dataclass

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


def _svm(cost: float, class_weight: dict[int, float] | None = None) -> object:
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


def _fit_single(x: np.ndarray, y: np.ndarray, cost: float) -> object:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    model = _svm(cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)  # type: ignore[attr-defined]
    return model


def _choose_cost_single(
    x: np.ndarray, y: np.ndarray, k: int, costs: Sequence[float], default: float, seed: int
) -> float:
    if k < 2 or len(costs) == 1:
        return default
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=min(k, 3), shuffle=True, random_state=seed)
    best, best_score = default, -1.0
    for cost in costs:
        score = np.mean(
            [
                (_fit_single(x[tr], y[tr], cost).predict(x[va]) == y[va]).mean()  # type: ignore[attr-defined]
                for tr, va in folds.split(x, y)
            ]
        )
        if score > best_score:
            best, best_score = cost, float(score)
    return best


def _fit_multi(x: np.ndarray, t: np.ndarray, cost: float) -> list[object | None]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    models: list[object | None] = []
    for c in range(t.shape[1]):
        keep = t[:, c] != 0
        y = t[keep, c]
        if len(np.unique(y)) < 2:
            models.append(None)
            continue
        model = _svm(cost, class_weight={1: 2.0, -1: 1.0})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x[keep], y)  # type: ignore[attr-defined]
        models.append(model)
    return models


def _map_multi(models: list[object | None], x: np.ndarray, t: np.ndarray) -> float:
    aps = []
    for c, model in enumerate(models):
        scores = (
            model.decision_function(x)  # type: ignore[attr-defined]
            if model is not None
            else np.zeros(len(x))
        )
        aps.append(voc_average_precision(scores, t[:, c]))
    return 100.0 * float(np.nanmean(aps))


def _choose_cost_multi(
    x: np.ndarray, t: np.ndarray, k: int, costs: Sequence[float], default: float, seed: int
) -> float:
    if k < 2 or len(costs) == 1:
        return default
    from sklearn.model_selection import KFold

    folds = KFold(n_splits=min(k, 3), shuffle=True, random_state=seed)
    best, best_score = default, -1.0
    for cost in costs:
        scores = [
            _map_multi(_fit_multi(x[tr], t[tr], cost), x[va], t[va]) for tr, va in folds.split(x)
        ]
        score = float(np.nanmean(scores))
        if score > best_score:
            best, best_score = cost, score
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
    multi = np.asarray(train_targets).ndim == 2
    out = []
    for k in ks:
        scores, chosen = [], []
        for run in range(runs):
            run_seed = seed * 1000 + run
            if multi:
                idx = sample_positives_per_class(train_targets, k, run_seed)
                cost = _choose_cost_multi(
                    x_train[idx], train_targets[idx], k, costs, default_cost, run_seed
                )
                models = _fit_multi(x_train[idx], train_targets[idx], cost)
                scores.append(_map_multi(models, x_test, test_targets))
            else:
                idx = sample_per_class(train_targets, k, run_seed)
                cost = _choose_cost_single(
                    x_train[idx], train_targets[idx], k, costs, default_cost, run_seed
                )
                model = _fit_single(x_train[idx], train_targets[idx], cost)
                pred = model.predict(x_test)  # type: ignore[attr-defined]
                scores.append(100.0 * float((pred == test_targets).mean()))
            chosen.append(cost)
        out.append(
            LowShotResult(
                k, float(np.mean(scores)), float(np.std(scores)), tuple(scores), tuple(chosen)
            )
        )
    return out
