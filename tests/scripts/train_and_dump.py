"""Run training (under any launcher) and dump what each rank ended with, for the tests.

    accelerate launch ... tests/scripts/train_and_dump.py DUMP_DIR section.key=value ...

Besides the history and the final cluster result, it counts how often this process ran the
single-process clustering (``cluster_features``) and the sharded one.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import pcl_scale.distributed.estep as estep
from pcl_scale.config import load_config
from pcl_scale.engine.loop import train

CALLS = {"cluster_features": 0, "cluster_sharded": 0}


def counting(name, fn):
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    dump = Path(sys.argv[1])
    estep.cluster_features = counting("cluster_features", estep.cluster_features)
    estep.cluster_sharded = counting("cluster_sharded", estep.cluster_sharded)
    result = train(load_config(None, sys.argv[2:]))
    rank = int(os.environ.get("RANK", "0"))  # the process group is gone after training
    dump.mkdir(parents=True, exist_ok=True)
    if result.clusters is not None:
        save_file(result.clusters.state_dict(), str(dump / f"clusters_rank{rank}.safetensors"))
    (dump / f"history_rank{rank}.json").write_text(json.dumps(result.history))
    (dump / f"calls_rank{rank}.json").write_text(json.dumps(CALLS))


if __name__ == "__main__":
    main()
