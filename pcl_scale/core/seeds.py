"""Seeds derived from tuples of integers, so that nearby inputs never give overlapping streams."""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (each taken modulo 2^32) through numpy's ``SeedSequence``.

    Unlike ``seed + i``, (s, i) and (s + 1, i - 1) give unrelated seeds.
    """
    words = [p & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)
