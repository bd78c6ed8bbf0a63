"""The ``pcl-scale`` command line.

pcl-scale train [--config FILE] [section.key=value ...]
pcl-scale eval EXPORT_DIR --source SOURCE [--protocols knn,linear,lowshot,cluster] ...
pcl-scale report RUN_DIR
"""

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


def eval_main(argv: Sequence[str]) -> int:
    import json

    import torch

    from pcl_scale.config import DataConfig
    from pcl_scale.distributed import Comm, init_from_env
    from pcl_scale.evaluation import (
        OPTIONAL_PROTOCOLS,
        PROTOCOLS,
        evaluate_export,
        format_evaluation,
    )
    from pcl_scale.linear_probe import ReferenceSchedule

    parser = argparse.ArgumentParser(
        prog="pcl-scale eval",
        description=(
            "Evaluate a published export (RUN_DIR/export) on a labelled dataset, learned "
            "features next to raw pixels. Under torchrun/accelerate launch the extraction is "
            "sharded over the processes."
        ),
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--source", required=True, help="data source, as data.source")
    parser.add_argument("--split", default="train", help="training / gallery split")
    parser.add_argument("--eval-split", default="test", help="test / query split")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--resize-size", type=int, default=0)
    parser.add_argument("--cache-dir", default=DataConfig.cache_dir)
    parser.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="use the first N samples of each split, as data.max_samples (0 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--protocols",
        default=",".join(PROTOCOLS),
        help=f"comma-separated, of {', '.join(PROTOCOLS + OPTIONAL_PROTOCOLS)}",
    )
    parser.add_argument(
        "--linear-epochs",
        type=int,
        default=100,
        help="linear_reference: epochs (milestones 60%%, 80%%)",
    )
    parser.add_argument("--lowshot-ks", default="1,2,4,8,16")
    parser.add_argument("--lowshot-runs", type=int, default=5)
    parser.add_argument("--run-dir", type=Path, help="also score this run's prototypes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(list(argv))
    if not (args.export_dir / "config.json").is_file():
        raise UserError(
            f"{args.export_dir} holds no config.json: pass a run's export directory "
            "(RUN_DIR/export)"
        )
    if args.max_samples < 0:
        raise UserError(f"--max-samples={args.max_samples}: give 0 (all) or a positive count")
    try:
        ks = [int(k) for k in args.lowshot_ks.split(",") if k]
    except ValueError as err:
        raise UserError(f"--lowshot-ks={args.lowshot_ks!r}: give integers, e.g. 1,2,4") from err
    device = init_from_env()
    data = DataConfig(
        source=args.source,
        image_column=args.image_column,
        label_column=args.label_column,
        resize_size=args.resize_size,
        cache_dir=args.cache_dir,
        max_samples=args.max_samples,
    )
    report = evaluate_export(
        args.export_dir,
        data,
        args.split,
        args.eval_split,
        [p for p in args.protocols.split(",") if p],
        Comm(),
        device,
        args.batch_size,
        ks,
        args.lowshot_runs,
        args.run_dir,
        args.seed,
        ReferenceSchedule(
            epochs=args.linear_epochs,
            milestones=(round(0.6 * args.linear_epochs), round(0.8 * args.linear_epochs)),
        ),
    )
    if report is not None:
        print(format_evaluation(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def report_main(argv: Sequence[str]) -> int:
    from pcl_scale.report import write_report

    parser = argparse.ArgumentParser(
        prog="pcl-scale report",
        description="Write RUN_DIR/report/report.md with PNG plots of a run.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory for the report (RUN_DIR/report)")
    args = parser.parse_args(list(argv))
    print(write_report(args.run_dir, args.out))
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
    commands = {"train": train_main, "eval": eval_main, "report": report_main}
    parser.add_argument("command", choices=list(commands), help="what to run")
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
    command, rest = argv[0], argv[1:]
    if command not in commands:
        parser.parse_args([command])
    try:
        return commands[command](rest)
    except UserError as err:
        print(f"pcl-scale: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
