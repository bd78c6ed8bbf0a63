"""Fused nearest-centroid search on CUDA (Triton): the product and the row minimum in one kernel.

The portable path (:func:`pcl_scale.kmeans.assign`) writes every (rows, K) block of scores to
memory and reads it back for the minimum. At ImageNet scale (N = 1.28M, K = 100k) that is about a
terabyte of traffic per Lloyd iteration, which bounds a GPU iteration by memory bandwidth rather
than by the matrix product. Here each program holds a (BLOCK_N, D) tile of points, streams the
centroids through in (D, BLOCK_K) tiles, and folds each tile's scores into a running minimum: only
the (N,) best scores and indices are written. The product runs on tensor cores in TF32; the
distance to the chosen centroid is then recomputed exactly in fp32.

Used automatically by :func:`pcl_scale.kmeans.assign` for float32 CUDA tensors when Triton is
installed (it ships with PyTorch's CUDA wheels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tile shape: of (128, 64, 8 warps, 3 stages), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 4, 4)
# and (256, 64, 8, 2), Triton's autotuner picked the last for K = 25k, 50k and 100k at N = 1.28M,
# D = 128 on an H200 (benchmarks/assign.py). It is fixed here: tuning on every start of a run
# cost 4 to 17 s per granularity.
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 256, 64, 8, 2


@triton.jit
def _nearest_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    ct_ptr,
    half_sq_ptr,
    best_ptr,
    index_ptr,
    n,
    k,
    d,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < n
    dim_ok = dims < d
    x = tl.load(
        x_ptr + rows[:, None] * d + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # (BLOCK_N, D_PAD)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        ct = tl.load(
            ct_ptr + dims[:, None] * k + cols[None, :],
            mask=dim_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (D_PAD, BLOCK_K): centroids transposed, contiguous along K
        half_sq = tl.load(half_sq_ptr + cols, mask=col_ok, other=float("inf"))
        # ||x - c||^2 = ||x||^2 + 2 (||c||^2 / 2 - x . c): only the bracket varies with c
        scores = half_sq[None, :] - tl.dot(x, ct, input_precision="tf32")
        tile_best, tile_index = tl.min(scores, axis=1, return_indices=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int32) + k0, best_index)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(index_ptr + rows, best_index, mask=row_ok)


def nearest_centroid(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row of ``x`` and its exact squared distance.

    Args:
        x: (N, D) float32 points on a CUDA device.
        centroids: (K, D) float32 centroids on the same device.

    Returns:
        assignments (N,) int64 and squared distances (N,) float32.
    """
    n, d = x.shape
    k = centroids.shape[0]
    x = x.contiguous()
    centroids_t = centroids.t().contiguous()  # (D, K)
    half_sq = 0.5 * centroids.pow(2).sum(1)  # (K,)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    index = torch.empty(n, dtype=torch.int32, device=x.device)

    grid = (triton.cdiv(n, BLOCK_N),)
    _nearest_kernel[grid](
        x,
        centroids_t,
        half_sq,
        best,
        index,
        n,
        k,
        d,
        D_PAD=triton.next_power_of_2(d),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    assignments = index.long()
    distances = (x - centroids[assignments]).pow(2).sum(1)  # exact fp32, (N,)
    return assignments, distances
