"""Negative-prototype sampling for ProtoNCE.

For each granularity the reference draws r negative prototypes uniformly without replacement from
the prototypes that are not the positive of any sample in the local batch (every id 0..K-1 is
eligible, the last one included). Here the draw is a seeded ``randperm`` of all K ids whose first
r eligible entries are located by a cumulative count and ``searchsorted``: no Python sets and no
data-dependent shapes, so the draw never makes the GPU wait for the host (``nonzero`` would, once
per granularity and step), and it is reproducible from the generator's state.
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
        ValueError: when ``K < r + B``, the condition under which r eligible prototypes are
            guaranteed whatever the batch's positives (``pcl.r`` is validated against it).
    """
    batch = pos_ids.numel()
    if num_prototypes - batch < r:
        raise ValueError(
            f"cannot draw r={r} negative prototypes from K={num_prototypes} prototypes with "
            f"{batch} samples in the local batch (up to {batch} of them are positives). Lower r "
            f"(pcl.r) to at most {num_prototypes - batch} or use more clusters: every granularity "
            "needs K >= r + local batch size."
        )
    eligible = torch.ones(num_prototypes, dtype=torch.bool, device=pos_ids.device)
    eligible[pos_ids] = False
    perm = torch.randperm(num_prototypes, generator=generator, device=generator.device)
    perm = perm.to(pos_ids.device)
    # the j-th eligible id in permutation order sits where the running count first reaches j
    count = torch.cumsum(eligible[perm], dim=0)
    wanted = torch.arange(1, r + 1, device=pos_ids.device, dtype=count.dtype)
    return perm[torch.searchsorted(count, wanted)]
