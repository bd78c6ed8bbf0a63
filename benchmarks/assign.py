"""One Lloyd iteration on a GPU, part by part: fused vs chunked assignment, sums, update.

    python benchmarks/assign.py                      # N = 1,281,167, D = 128, K = 25k/50k/100k
    python benchmarks/assign.py --tiles 256,64,8,2 128,128,8,3 256,128,8,2

For each K: the fused Triton assignment for each product precision (float16 and TF32; first call:
compilation, then the median of 5 calls, with the kernel's tile shape), the chunked product +
minimum it replaces, the per-cluster sums and counts, and the centroid update; TFLOP/s counts
2 N D K per assignment. ``--tiles`` adds float16 rows for other tile shapes (BLOCK_N, BLOCK_K,
warps, stages), and the share of picks that differ from the default kernel's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import pcl_scale.core.kmeans as km


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


def tile(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"tile {text!r}: give BLOCK_N,BLOCK_K,warps,stages")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[25000, 50000, 100000])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "tf32"])
    parser.add_argument("--tiles", type=tile, nargs="*", default=[])
    args = parser.parse_args()
    from pcl_scale.core import kmeans_triton as kt

    device = torch.device("cuda")
    x = unit_vectors(args.n, args.d, device)
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, N = {args.n:,}, D = {args.d}\n")
    print(
        "| K | precision | tile (BN, BK, warps, stages) | fused first call (s) | fused (s) |"
        " TFLOP/s | picks unlike the default's | chunked (s) | sums (s) | update (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    default_precision, default_tiles = kt.PRECISION, dict(kt.TILES)
    runs = [(p, kt.TILES[p]) for p in args.precisions]
    runs += [("fp16", t) for t in args.tiles if t != kt.TILES["fp16"]]
    for k in args.ks:
        c = x[torch.randperm(args.n, generator=gen)[:k].to(device)].clone()
        km.USE_FUSED_ASSIGN = False
        chunked = seconds(partial(km.assign, x, c, km.GPU_CHUNK_BYTES), 3)
        km.USE_FUSED_ASSIGN = True
        reference, _ = km.assign(x, c)  # the default kernel's picks
        sums_t = seconds(partial(km.cluster_sums, x, reference, k), 5)
        sums, counts = km.cluster_sums(x, reference, k)
        update_t = seconds(partial(km._update_centroids, c, sums, counts, False, "reseed", gen), 5)
        for precision, shape in runs:
            kt.PRECISION, kt.TILES[precision] = precision, shape
            first = seconds(partial(km.assign, x, c), 1)
            fused = seconds(partial(km.assign, x, c), 5)
            a, _ = km.assign(x, c)
            differ = float((a != reference).float().mean())
            tflops = 2 * args.n * args.d * k / fused / 1e12
            print(
                f"| {k:,} | {precision} | {shape} | {first:.3f} | {fused:.4f} | {tflops:.0f} | "
                f"{differ:.2e} | {chunked:.4f} | {sums_t:.4f} | {update_t:.4f} |",
                flush=True,
            )
            kt.PRECISION, kt.TILES = default_precision, dict(default_tiles)


if __name__ == "__main__":
    main()
