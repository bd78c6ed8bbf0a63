"""Nearest-centroid picks from float16-rounded vs TF32-rounded inputs, against float64 (CPU).

    python benchmarks/assign_precision.py            # 20,000 points, 2,000 centroids, D = 128

(No GPU needed; Triton must be importable, as the dev extra installs it on Linux x86_64.)

The fused CUDA kernel multiplies either float16 inputs (after a power-of-two rescale that brings
the largest magnitude below 1) or TF32 inputs, accumulating in float32. Both keep a 10-bit
mantissa; this script rounds the same data both ways on the CPU (float16 with the kernel's own
scale), takes each row's best centroid from the rounded products (accumulated in float64, so
only the input rounding differs) and compares the picks with the exact nearest centroid.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pcl_scale.core.kmeans_triton import power_of_two_scale


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (to nearest, ties away from zero)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + (1 << 12)) & ~((1 << 13) - 1)).view(torch.float32)


def fp16_round(t: torch.Tensor, scale: float) -> torch.Tensor:
    return (t * scale).half().float() / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=2_000)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(args.k // 10, args.d, generator=g), dim=1)
    x = centres[torch.randint(len(centres), (args.n,), generator=g)]
    x = F.normalize(x + 0.3 * torch.randn(args.n, args.d, generator=g), dim=1)
    c = x[torch.randperm(args.n, generator=g)[: args.k]].clone()
    scale = float(power_of_two_scale(x, c))  # the kernel's
    xd, cd = x.double(), c.double()
    exact = xd.pow(2).sum(1, keepdim=True) - 2 * xd @ cd.T + cd.pow(2).sum(1)  # (n, k)
    best = exact.min(1).values
    half_sq = 0.5 * cd.pow(2).sum(1)
    print(f"N = {args.n:,}, K = {args.k:,}, D = {args.d}, power-of-two scale {scale:g}\n")
    print("| inputs | picks equal to the exact nearest | largest excess distance | mean excess |")
    print("|---|---|---|---|")
    for name, (xr, cr) in {
        "float32": (x, c),
        "TF32": (tf32_round(x), tf32_round(c)),
        "float16, rescaled": (fp16_round(x, scale), fp16_round(c, scale)),
    }.items():
        picks = (half_sq - xr.double() @ cr.double().T).argmin(1)
        excess = exact.gather(1, picks[:, None]).squeeze(1) - best
        agree = float((picks == exact.argmin(1)).double().mean())
        print(f"| {name} | {agree:.4%} | {float(excess.max()):.2e} | {float(excess.mean()):.2e} |")


if __name__ == "__main__":
    main()
