"""One process of the trainer rehearsal: ``pcl-scale train`` with its memory written at exit.

    python -m torch.distributed.run --nproc_per_node W benchmarks/rehearsal_rank.py OUT train ...

Writes ``OUT/memory_rank{RANK}.json``: the resident memory after the libraries are imported
(``baseline_mb``) and the process's peak (``peak_mb``, ``ru_maxrss``), so that what the run itself
adds per rank is their difference.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path

import pcl_scale.cli  # torch, accelerate, datasets: imported before the baseline is read


def resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    baseline = resident_mb()

    def write_memory() -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {"rank": rank, "baseline_mb": baseline, "peak_mb": peak}
        (out / f"memory_rank{rank}.json").write_text(json.dumps(record))

    atexit.register(write_memory)
    return pcl_scale.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
