"""Negative-prototype sampling for ProtoNCE, all granularities in one draw.

Rule (the reference's): per granularity, r negatives uniformly without replacement from the
prototypes that are no positive of the local batch. Each granularity gets a row of uniform float64
keys, one per prototype id (padded to the largest K with +inf); the positives are set to +inf and
the r smallest keys are the negatives. Why: one ``rand``, ``scatter_`` and ``topk`` for all M
granularities, no Python sets and no data-dependent shapes, so the GPU never waits for the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class NegativeSampler:
    """Draws r distinct negative prototype ids per granularity, never a positive of the batch.

    Args:
        num_prototypes: K of every granularity, e.g. (25000, 50000, 100000).
        device: where the draws are made and returned.
    """

    def __init__(self, num_prototypes: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.num_prototypes = tuple(int(k) for k in num_prototypes)
        ids = torch.arange(max(self.num_prototypes), device=device)
        limits = torch.tensor(self.num_prototypes, device=device)
        # +inf past each granularity's K: padded ids are never among the r smallest keys
        self.padding = torch.zeros(
            len(self.num_prototypes), ids.numel(), dtype=torch.float64, device=device
        )
        self.padding.masked_fill_(ids >= limits[:, None], float("inf"))

    def __call__(self, pos_ids: Tensor, r: int, generator: torch.Generator) -> Tensor:
        """Draw the negatives of one local batch.

        Args:
            pos_ids: (M, B) int64 positive prototype id of each sample, per granularity.
            r: number of negatives per granularity.
            generator: seeded generator; the keys are drawn on its device.

        Returns:
            (M, r) int64 negative ids (per-granularity ids, in no particular order).

        Raises:
            ValueError: when ``K < r + B`` for some granularity, the condition under which r
                eligible prototypes are guaranteed whatever the batch's positives (``pcl.r`` is
                validated against it).
        """
        batch, k = pos_ids.shape[1], min(self.num_prototypes)
        if k - batch < r:
            raise ValueError(
                f"cannot draw r={r} negative prototypes from K={k} prototypes with {batch} "
                f"samples in the local batch (up to {batch} of them are positives). Lower r "
                f"(pcl.r) to at most {k - batch} or use more clusters: every granularity "
                "needs K >= r + local batch size."
            )
        keys = torch.rand(
            self.padding.shape, generator=generator, dtype=torch.float64, device=generator.device
        )
        keys = keys.to(self.padding.device).add_(self.padding)
        keys.scatter_(1, pos_ids, float("inf"))
        return keys.topk(r, dim=1, largest=False, sorted=False).indices
