"""The ``pcl-scale`` command line: ``pcl-scale train [--config FILE] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pcl_scale import __version__
from pcl_scale.errors import UserError

DEFAULT_RECIPE = "configs/digits.yaml"
# Exit statuses: 0 done; 2 a user error (message on stderr); 3 stopped by SIGTERM/SIGINT after
# saving a resume checkpoint (run again with run.resume=auto).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3


def _train_parser() -> argparse.ArgumentParser:
    from pcl_scale.config import describe_options

    return argparse.ArgumentParser(
        prog="pcl-scale train",
        description=(
            "Train PCL. Options come from the defaults below, then --config, then overrides "
            "given as section.key=value. With no arguments the embedded default recipe "
            f"({DEFAULT_RECIPE}: digits, a few minutes on a laptop CPU) runs."
        ),
        epilog="options (section.key=default):\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def train_main(argv: Sequence[str]) -> int:
    parser = _train_parser()
    parser.add_argument("--config", help="YAML recipe (default: the digits recipe)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(list(argv))

    from pcl_scale.config import load_config
    from pcl_scale.train import format_report, train

    cfg = load_config(args.config or _default_recipe(), args.overrides)
    result = train(cfg)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.evaluation and _is_main():
        print("\nlearned vs raw features:\n" + format_report(result.evaluation))
    if result.export_dir is not None:
        print(f"run directory: {result.run_dir}\nexport: {result.export_dir}")
    return 0


def _default_recipe() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / DEFAULT_RECIPE).is_file():
            return base / DEFAULT_RECIPE
    raise UserError(
        f"no --config given and the default recipe {DEFAULT_RECIPE} is not found from "
        f"{Path.cwd()}: run from the pcl-scale checkout or pass --config FILE"
    )


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="pcl-scale", description="Prototypical Contrastive Learning at scale."
    )
    parser.add_argument("--version", action="version", version=f"pcl-scale {__version__}")
    parser.add_argument("command", choices=["train"], help="what to run")
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
    command, rest = argv[0], argv[1:]
    if command != "train":
        parser.parse_args([command])
    try:
        return train_main(rest)
    except UserError as err:
        print(f"pcl-scale: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
