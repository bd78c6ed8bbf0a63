"""Entry point for ``accelerate launch launch.py [options]``: the same as ``pcl-scale train``."""

import sys

from pcl_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
