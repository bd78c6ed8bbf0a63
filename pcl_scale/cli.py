"""The ``pcl-scale`` command line.

pcl-scale train [--config FILE|RECIPE] [--print-config] [section.key=value ...]
pcl-scale eval EXPORT_DIR [--config FILE] [data.source=SOURCE eval.protocols=[knn,cluster] ...]
pcl-scale push EXPORT_DIR REPO_ID [--private]
pcl-scale report RUN_DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcl_scale import __version__
from pcl_scale.errors import UserError
from pcl_scale.recipes import DEFAULT_RECIPE, recipe_names

# Exit statuses: 0 done; 2 a user error (message on stderr); 3 stopped by SIGTERM/SIGINT after
# saving a resume checkpoint (run again with run.resume=auto).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3


def _train_parser() -> argparse.ArgumentParser:
    from pcl_scale.config import describe_options

    parser = argparse.ArgumentParser(
        prog="pcl-scale train",
        description=(
            "Train PCL. Options come from the defaults below, then --config, then overrides "
            "given as section.key=value. With no arguments the packaged default recipe "
            f"({DEFAULT_RECIPE}: scikit-learn's digits, a few minutes on a laptop CPU) runs."
        ),
        epilog="options (section.key=default):\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE|RECIPE",
        help=f"a YAML file, or a packaged recipe by name: {', '.join(recipe_names())} "
        f"(default: {DEFAULT_RECIPE})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe and overrides) as YAML and exit without training",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def train_main(argv: Sequence[str]) -> int:
    args = _train_parser().parse_args(list(argv))

    from pcl_scale.config import load_config

    cfg = load_config(args.config or DEFAULT_RECIPE, args.overrides)
    if args.print_config:
        import yaml

        from pcl_scale.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    from pcl_scale.engine.loop import train
    from pcl_scale.evaluation.tables import format_report

    result = train(cfg)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.evaluation and _is_main():
        print("\nlearned vs raw features:\n" + format_report(result.evaluation))
    if result.export_dir is not None:
        print(f"run directory: {result.run_dir}\nexport: {result.export_dir}")
    return 0


EVAL_DEFAULTS = ["data.eval_split=test"]  # pcl-scale eval scores a held-out split by default


def eval_main(argv: Sequence[str]) -> int:
    from pcl_scale.config import describe_options, load_config
    from pcl_scale.validation import validate_eval

    parser = argparse.ArgumentParser(
        prog="pcl-scale eval",
        description=(
            "Evaluate a published export (RUN_DIR/export) on a labelled dataset, learned "
            "features next to raw pixels. Options come from the defaults below, then --config "
            "(e.g. the run's config.yaml), then section.key=value overrides. Under "
            "torchrun/accelerate launch the extraction is sharded over the processes."
        ),
        epilog="options (section.key=default):\n"
        + describe_options(("data", "eval")).replace("data.eval_split=''", "data.eval_split=test"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="an export folder (RUN_DIR/export) or any timm model folder, or a timm model name "
        "with pretrained weights in the local Hub cache (e.g. resnet50.a1_in1k) as a baseline",
    )
    parser.add_argument("--config", help="YAML with data/eval sections (e.g. RUN_DIR/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=digits")
    args, unknown = parser.parse_known_intermixed_args(list(argv))
    if unknown:
        raise UserError(
            f"unknown option {unknown[0]}: pcl-scale eval takes section.key=value overrides "
            "(e.g. eval.protocols=[knn,cluster]); --help lists them"
        )
    check_eval_model(args.model)
    cfg = load_config(args.config, args.overrides, command_defaults=EVAL_DEFAULTS)
    validate_eval(cfg)
    return run_eval(Path(args.model), cfg)


def check_eval_model(model: str) -> None:
    """A folder with a ``config.json``, or a timm model name; a UserError saying which it is not."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(
            f"{model} holds no config.json: pass a run's export folder (RUN_DIR/export)"
        )
    weights = ("model.safetensors", "pytorch_model.bin")
    if path.is_dir() and not any((path / name).is_file() for name in weights):
        raise UserError(
            f"{model} holds no model.safetensors: the export is incomplete; export the run again "
            "or pass another folder"
        )
    if not path.exists():
        import timm

        if not timm.is_model(model.removeprefix("timm:")):
            raise UserError(
                f"{model!r} is neither an export folder nor a timm model name: pass RUN_DIR/export "
                "or a name from timm.list_pretrained()"
            )


def run_eval(export_dir: Path, cfg: Any) -> int:
    import torch

    from pcl_scale.distributed.comm import Comm, init_from_env
    from pcl_scale.evaluation.protocols import evaluate_export
    from pcl_scale.evaluation.tables import format_evaluation, write_json_atomic

    device = init_from_env(cfg.run.collective_timeout_min)
    json_path = Path(cfg.eval.json) if cfg.eval.json else None

    def save(report: dict[str, dict[str, Any]]) -> None:  # after every protocol (rank 0)
        if json_path is not None:
            write_json_atomic(json_path, report)

    report = evaluate_export(export_dir, cfg.data, cfg.eval, Comm(), device, on_result=save)
    if report is not None:
        save(report)
        print(format_evaluation(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def push_main(argv: Sequence[str]) -> int:
    from pcl_scale.engine.export import push_export

    parser = argparse.ArgumentParser(
        prog="pcl-scale push",
        description="Upload an export folder to the Hugging Face Hub as a model repository "
        "(timm loads it with timm.create_model('hf-hub:REPO_ID', pretrained=True)). Needs a "
        "token (hf auth login or HF_TOKEN) and network; the folder is only read.",
    )
    parser.add_argument("export_dir", type=Path, help="a run's export folder (RUN_DIR/export)")
    parser.add_argument("repo_id", help="ORG/NAME on the Hub (created when it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(list(argv))
    print(f"pushed {args.export_dir} to {push_export(args.export_dir, args.repo_id, args.private)}")
    return 0


def report_main(argv: Sequence[str]) -> int:
    from pcl_scale.evaluation.report import write_report

    parser = argparse.ArgumentParser(
        prog="pcl-scale report",
        description="Write RUN_DIR/report/report.md with PNG plots of a run.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory for the report (RUN_DIR/report)")
    args = parser.parse_args(list(argv))
    print(write_report(args.run_dir, args.out))
    return 0


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="pcl-scale", description="Prototypical Contrastive Learning at scale."
    )
    parser.add_argument("--version", action="version", version=f"pcl-scale {__version__}")
    commands = {"train": train_main, "eval": eval_main, "push": push_main, "report": report_main}
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
