"""Evaluate a published export with every protocol, learned features next to raw pixels.

    python eval/evaluate.py RUN_DIR/export data.source=digits [eval.protocols=[knn,cluster]]
    torchrun --nproc_per_node 8 eval/evaluate.py EXPORT data.source=/data/imagenet   # sharded

The same as ``pcl-scale eval`` (options: ``--help``); the code is
:mod:`pcl_scale.evaluation.protocols`.
"""

import sys

from pcl_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
