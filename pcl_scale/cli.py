"""The ``pcl-scale`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pcl_scale import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pcl-scale", description="Prototypical Contrastive Learning at scale."
    )
    parser.add_argument("--version", action="version", version=f"pcl-scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train PCL (not available in this version)", add_help=False)
    args, _ = parser.parse_known_args(argv)
    if args.command == "train":
        print(
            "pcl-scale train: the training loop is not part of this version yet; the PCL core "
            "(losses, k-means, concentration, model) is importable from pcl_scale.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
