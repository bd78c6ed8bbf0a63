"""Fused nearest-centroid search on CUDA (Triton): the product and the row minimum in one kernel.

The portable path (:func:`pcl_scale.core.kmeans.assign`) writes every (rows, K) block of scores to
memory and reads it back for the minimum. At ImageNet scale (N = 1.28M, K = 100k) that is about a
terabyte of traffic per Lloyd iteration, which bounds a GPU iteration by memory bandwidth rather
than by the matrix product. Here each program holds a (BLOCK_N, D) tile of points, streams the
centroids through in (D, BLOCK_K) tiles, and folds each tile's scores into a running minimum: only
the (N,) best indices are written. The distance to the chosen centroid is then recomputed exactly
in fp32.

Precision of the product (``PRECISION``):

- ``"fp16"`` (default): points and centroids are multiplied by one power of two that brings the
  largest magnitude of either below 1 (exact, and it moves every distance by the same factor, so
  the nearest centroid is unchanged), then rounded to float16 (the points tile by tile inside the
  kernel); the products accumulate in fp32.
  A float16 input keeps the same 10-bit mantissa as a TF32 one, so the scores are as precise as
  in ``"tf32"``, while the tensor cores run at twice the TF32 rate and the streamed centroids take
  half the bytes (K = 100k at D = 128: 26 MB, within an H100/H200's L2 cache).
- ``"tf32"``: float32 inputs, TF32 products.

Used automatically by :func:`pcl_scale.core.kmeans.assign` for float32 CUDA tensors when Triton is
installed (it ships with PyTorch's CUDA wheels). With ``TRITON_INTERPRET=1`` the same kernel runs
on CPU tensors through Triton's interpreter (slow; for testing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

PRECISION = "fp16"
# The kernel addresses points with int32 offsets (row * D + column): one launch covers fewer than
# 2^31 elements of x, so large N runs as several launches over row ranges.
MAX_LAUNCH_ELEMENTS = 2**31 - 1

# Tile shape (BLOCK_N, BLOCK_K, warps, stages) per precision, fixed rather than autotuned (tuning
# at every start of a run costs seconds per granularity). Chosen from the tile tables measured on
# an H200 with `benchmarks/assign.py --tiles` (docs/benchmarks.md): within 5% of the best shape
# at K = 25k, 50k and 100k.
TILES: dict[str, tuple[int, int, int, int]] = {
    "fp16": (256, 64, 8, 3),
    "tf32": (256, 64, 8, 2),
}


@triton.jit
def _nearest_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    ct_ptr,
    half_sq_ptr,
    scale_ptr,
    index_ptr,
    n,
    k,
    d,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < n
    dim_ok = dims < d
    x = tl.load(
        x_ptr + rows[:, None] * d + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # (BLOCK_N, D_PAD) float32
    if FP16:
        x = (x * tl.load(scale_ptr)).to(tl.float16)  # exact scaling, then one rounding
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
        if FP16:  # noqa: SIM108 (resolved at compile time: FP16 is a constexpr)
            products = tl.dot(x, ct)  # float16 inputs, float32 accumulation
        else:
            products = tl.dot(x, ct, input_precision="tf32")
        scores = half_sq[None, :] - products
        tile_best, tile_index = tl.min(scores, axis=1, return_indices=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int32) + k0, best_index)
    tl.store(index_ptr + rows, best_index, mask=row_ok)


def launch_ranges(n: int, d: int, block_n: int) -> list[tuple[int, int]]:
    """Row ranges of one launch each: whole tiles, every offset (row * d + column) below 2^31."""
    rows = max(block_n, (MAX_LAUNCH_ELEMENTS // d - block_n) // block_n * block_n)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def padded_dim(d: int) -> int:
    """The kernel's tile width for D: a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(d))


def power_of_two_scale(x: Tensor, centroids: Tensor) -> Tensor:
    """2^-e with the largest magnitude of either = m * 2^e, 0.5 <= m < 1, as a 0-d tensor.

    Computed on the device (no host sync) and without an (N, D) temporary.
    """
    inf = float("inf")
    largest = torch.maximum(
        torch.linalg.vector_norm(x, inf), torch.linalg.vector_norm(centroids, inf)
    )
    exponent = torch.frexp(largest).exponent.clamp(-100, 100)  # the scale stays finite
    return torch.ldexp(torch.ones_like(largest), -exponent)


def nearest_centroid(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row of ``x`` and its exact squared distance.

    Args:
        x: (N, D) float32 points on a CUDA device.
        centroids: (K, D) float32 centroids on the same device.

    Returns:
        assignments (N,) int64 and squared distances (N,) float32.
    """
    if PRECISION not in TILES:
        raise ValueError(f"PRECISION = {PRECISION!r}: use one of {sorted(TILES)}")
    n, d = x.shape
    k = centroids.shape[0]
    x = x.contiguous()
    fp16 = PRECISION == "fp16"
    if fp16:
        scale = power_of_two_scale(x, centroids)  # the kernel scales each tile of points it loads
        scaled = centroids * scale  # exact: a power of two
        centroids_t = scaled.t().half().contiguous()  # (D, K)
        half_sq = 0.5 * scaled.pow(2).sum(1)  # (K,) float32
    else:
        scale = torch.ones((), device=x.device)
        centroids_t = centroids.t().contiguous()
        half_sq = 0.5 * centroids.pow(2).sum(1)
    index = torch.empty(n, dtype=torch.int32, device=x.device)
    block_n, block_k, num_warps, num_stages = TILES[PRECISION]
    for start, stop in launch_ranges(n, d, block_n):
        _nearest_kernel[(triton.cdiv(stop - start, block_n),)](
            x[start:stop],
            centroids_t,
            half_sq,
            scale,
            index[start:stop],
            stop - start,
            k,
            d,
            D_PAD=padded_dim(d),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            FP16=fp16,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    assignments = index.long()
    distances = (x - centroids[assignments]).pow(2).sum(1)  # exact fp32, (N,)
    return assignments, distances
