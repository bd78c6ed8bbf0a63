"""The clustering score's k-means: pcl-scale vs scikit-learn, same settings, side by side.

    python benchmarks/eval_kmeans.py                      # N = 20,000, D = 512, K = 10
    python benchmarks/eval_kmeans.py --n 5000 --repeats 1  # smaller

The settings are those of ``pcl-scale eval``'s ``cluster`` protocol: k-means++ seeding, at most 100
Lloyd iterations, 10 restarts, the lowest objective kept. Three timings, interleaved (each round
runs all three) and the best of ``--repeats`` rounds kept, since other work on a shared machine
only ever adds time (scikit-learn runs OpenMP's default threads, one per core; torch
``--threads``, by default as many):

* ``pcl-scale kmeans``: :func:`pcl_scale.core.kmeans.kmeans` (torch backend, k-means++ on all rows);
* ``pcl-scale eval path``: :func:`pcl_scale.core.kmeans.kmeans_sharded` on one process with the
  evaluation's options (``KMEANS_SCORES``: k-means++ on a seeded sample of 8 K rows), what
  ``sharded_kmeans_scores`` runs;
* ``scikit-learn``: ``sklearn.cluster.KMeans(K, init="k-means++", n_init=10, max_iter=100)`` with
  its default ``tol=1e-4``.

Prints seconds, the ratio to scikit-learn, the objective (inertia) each reached and, where the code
reports it, the Lloyd iterations of the kept restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pcl_scale.core.kmeans import kmeans, kmeans_sharded
from pcl_scale.evaluation.sharded import KMEANS_SCORES


def features(n: int, d: int, k: int, spread: float, seed: int) -> torch.Tensor:
    """(n, d) unit vectors around ``k`` random centres; ``spread`` is the noise norm per point
    relative to the centres' unit norm (larger: more overlap, more Lloyd iterations)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    noise = spread / d**0.5 * torch.randn(n, d, generator=g)
    return F.normalize(centres[torch.randint(k, (n,), generator=g)] + noise, dim=1)


def pcl_kmeans(x: torch.Tensor, k: int, niter: int, nredo: int) -> tuple[float, Any]:
    res = kmeans(x, k, niter=niter, nredo=nredo, init="kmeans++", seed=0, backend="torch")
    return res.objective, getattr(res, "iterations", "-")


def pcl_eval_path(x: torch.Tensor, k: int, niter: int, nredo: int) -> tuple[float, Any]:
    options = dataclasses.replace(KMEANS_SCORES, niter=niter, nredo=nredo)
    res = kmeans_sharded(x, torch.arange(x.shape[0]), x.shape[0], k, lambda t: t, options)
    return res.objective, getattr(res, "iterations", "-")


def sklearn_kmeans(x: torch.Tensor, k: int, niter: int, nredo: int) -> tuple[float, Any]:
    from sklearn.cluster import KMeans

    km = KMeans(k, init="k-means++", n_init=nredo, max_iter=niter, random_state=0)
    km.fit(x.numpy())
    return float(km.inertia_), int(km.n_iter_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--niter", type=int, default=KMEANS_SCORES.niter)
    parser.add_argument("--nredo", type=int, default=KMEANS_SCORES.nredo)
    parser.add_argument("--spread", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch's")
    args = parser.parse_args()

    import sklearn

    torch.set_num_threads(args.threads)
    x = features(args.n, args.d, args.k, args.spread, seed=0)
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}; N={args.n}, D={args.d}, "
        f"K={args.k}, k-means++, niter<={args.niter}, nredo={args.nredo}, spread={args.spread}, "
        f"best of {args.repeats} interleaved rounds"
    )
    runs: dict[str, Callable[..., tuple[float, Any]]] = {
        "scikit-learn KMeans": sklearn_kmeans,
        "pcl-scale kmeans": pcl_kmeans,
        "pcl-scale eval path (kmeans_sharded)": pcl_eval_path,
    }
    best = {name: float("inf") for name in runs}
    out: dict[str, tuple[float, Any]] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out[name] = fn(x, args.k, args.niter, args.nredo)
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = best["scikit-learn KMeans"]
    print("| implementation | seconds | / scikit-learn | objective | Lloyd iterations (kept run) |")
    print("|---|---|---|---|---|")
    for name in runs:
        objective, iterations = out[name]
        print(
            f"| {name} | {best[name]:.2f} | {best[name] / ref:.2f} | {objective:.2f} "
            f"| {iterations} |"
        )


if __name__ == "__main__":
    main()
