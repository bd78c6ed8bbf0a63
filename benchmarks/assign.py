"""One Lloyd iteration on a GPU, part by part: fused vs chunked assignment, sums, update.

    python benchmarks/assign.py                      # N = 1,281,167, D = 128, K = 25k/50k/100k

For each K: the fused Triton assignment (first call: compilation, then the median of 5 calls,
with the kernel's tile shape), the chunked product + minimum it replaces, the
per-cluster sums and counts, and the centroid update; TFLOP/s counts 2 N D K per assignment.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import pcl_scale.kmeans as km


def unit_vectors(n: int, d: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(1000, d, generator=g), dim=1)
    x = centres[torch.randint(1000, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1).to(device)


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[25000, 50000, 100000])
    args = parser.parse_args()
    device = torch.device("cuda")
    x = unit_vectors(args.n, args.d, device)
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, N = {args.n:,}, D = {args.d}\n")
    print(
        "| K | fused first call (s) | fused (s) | TFLOP/s | tile (BN, BK, warps, stages) |"
        " chunked (s) | sums (s) | update (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        c = x[torch.randperm(args.n, generator=gen)[:k].to(device)].clone()
        km.USE_FUSED_ASSIGN = True
        first = seconds(partial(km.assign, x, c), 1)
        fused = seconds(partial(km.assign, x, c), 5)
        from pcl_scale import kmeans_triton as kt

        tile = (kt.BLOCK_N, kt.BLOCK_K, kt.NUM_WARPS, kt.NUM_STAGES)
        km.USE_FUSED_ASSIGN = False
        chunked = seconds(partial(km.assign, x, c, km.GPU_CHUNK_BYTES), 3)
        km.USE_FUSED_ASSIGN = True
        a, _ = km.assign(x, c)
        sums_t = seconds(partial(km.cluster_sums, x, a, k), 5)
        sums, counts = km.cluster_sums(x, a, k)
        update_t = seconds(partial(km._update_centroids, c, sums, counts, False, "reseed", gen), 5)
        tflops = 2 * args.n * args.d * k / fused / 1e12
        print(
            f"| {k:,} | {first:.3f} | {fused:.4f} | {tflops:.0f} | {tile} | {chunked:.4f} | "
            f"{sums_t:.4f} | {update_t:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
