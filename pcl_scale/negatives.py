"""Negative-prototype sampling for ProtoNCE.

For each granularity the reference draws r negative prototypes uniformly without replacement from
the prototypes that are not the positive of any sample in the local batch (every id 0..K-1 is
eligible, the last one included). Here the draw is a boolean mask plus a seeded ``randperm``: no
Python sets on the training path, reproducible from the generator's state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_negative_prototypes(
    pos_ids: Tensor, num_prototypes: int, r: int, generator: torch.Generator
) -> Tensor:
    """Draw ``r`` distinct prototype ids that are not in ``pos_ids``.

    Args:
        pos_ids: (B,) int64 positive prototype id of each sample in the local batch.
        num_prototypes: K, the number of prototypes of this granularity.
        r: number of negatives to draw.
        generator: seeded generator; the permutation is drawn on its device.

    Returns:
        (r,) int64 negative ids on ``pos_ids.device``.

    Raises:
        ValueError: when fewer than ``r`` prototypes are eligible.
    """
    eligible = torch.ones(num_prototypes, dtype=torch.bool, device=pos_ids.device)
    eligible[pos_ids] = False
    candidates = torch.nonzero(eligible).squeeze(1)  # (K - |unique(pos_ids)|,)
    n = candidates.numel()
    if n < r:
        raise ValueError(
            f"cannot draw r={r} negative prototypes: only {n} of K={num_prototypes} prototypes "
            f"are not a positive of the {pos_ids.numel()} samples in the local batch "
            f"({num_prototypes - n} distinct positives). Lower r (pcl.r) below {n} or use more "
            f"clusters: every granularity needs K >= r + local batch size."
        )
    perm = torch.randperm(n, generator=generator, device=generator.device)[:r]
    return candidates[perm.to(candidates.device)]
