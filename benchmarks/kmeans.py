"""k-means benchmark: the built-in torch backend vs faiss, side by side in one run.

    python benchmarks/kmeans.py                        # N = 100,000, D = 128, K = 1,000 and 10,000
    python benchmarks/kmeans.py --n 20000 --k 100 500  # smaller

Both backends start from the same seeded random rows and run the same number of Lloyd iterations
plus one final assignment of all points. ``faiss (library)`` is ``faiss.Kmeans`` called directly
(its own initialisation), to show that the wrapper adds nothing. Prints times and the ratio
torch / faiss; the target is <= 1.5.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from pcl_scale.core.kmeans import kmeans

T = TypeVar("T")


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    """Unit vectors drawn around 1,000 random centres, so the clusters have some structure."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(1000, d, generator=g), dim=1)
    x = centres[torch.randint(1000, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def faiss_library(x: np.ndarray, k: int, niter: int, seed: int) -> float:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=10**9)
    km.train(x)
    _, idx = km.index.search(x, 1)
    return float(len(np.unique(idx)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = unit_vectors(args.n, args.d, seed=0)
    xn = np.ascontiguousarray(x.numpy())
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, faiss {faiss.__version__}; N={args.n}, D={args.d}, "
        f"niter={args.niter}, best of {args.repeats}"
    )
    print("| K | torch backend (s) | faiss backend (s) | faiss library (s) | torch / faiss |")
    print("|---|---|---|---|---|")
    for k in args.k:
        t_torch, r_torch = timed(
            partial(kmeans, x, k, niter=args.niter, backend="torch"), args.repeats
        )
        t_faiss, r_faiss = timed(
            partial(kmeans, x, k, niter=args.niter, backend="faiss"), args.repeats
        )
        t_lib, _ = timed(partial(faiss_library, xn, k, args.niter, 0), args.repeats)
        rel = abs(r_torch.objective - r_faiss.objective) / r_faiss.objective
        print(
            f"| {k:,} | {t_torch:.2f} | {t_faiss:.2f} | {t_lib:.2f} | {t_torch / t_faiss:.2f} |"
            f"  (objective rel. diff {rel:.1e})"
        )


if __name__ == "__main__":
    main()
