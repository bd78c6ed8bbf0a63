"""Run training (under any launcher) and dump what each rank ended with, for the tests.

accelerate launch ... tests/scripts/train_and_dump.py DUMP_DIR section.key=value ...
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from pcl_scale.config import load_config
from pcl_scale.train import train


def main() -> None:
    dump = Path(sys.argv[1])
    result = train(load_config(None, sys.argv[2:]))
    rank = int(os.environ.get("RANK", "0"))  # the process group is gone after training
    dump.mkdir(parents=True, exist_ok=True)
    if result.clusters is not None:
        save_file(result.clusters.state_dict(), str(dump / f"clusters_rank{rank}.safetensors"))
    (dump / f"history_rank{rank}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    main()
