"""kNN accuracy and k-means NMI/AMI of a published pcl-scale export on a labelled dataset.

    python eval/knn.py runs/digits/export data.source=digits data.split=train data.eval_split=test

The export directory is what a run writes (``model.safetensors`` + ``config.json``); the model is
rebuilt with plain torchvision/timm. Options are the ``data`` section of the config tree. The kNN
gallery is ``data.split``, the queries ``data.eval_split`` (k = 5, cosine, majority vote); k-means
(K = number of classes) runs on both splits together. Raw pixels of the same view are reported next
to the learned features, by the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pcl_scale.artifacts import load_exported_backbone
from pcl_scale.cli import EVAL_DEFAULTS
from pcl_scale.config import DataConfig, describe_options, load_config
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import ExtractOptions, extract_all
from pcl_scale.errors import UserError
from pcl_scale.evaluation.metrics import representation_scores
from pcl_scale.evaluation.protocols import data_for_export
from pcl_scale.evaluation.tables import format_report
from pcl_scale.validation import validate_eval


def evaluate_export(
    export_dir: Path, data: DataConfig, batch_size: int = 256, k: int = 5
) -> dict[str, dict[str, float]]:
    """kNN and k-means scores of the export's features and of raw pixels (one process)."""
    model, config = load_exported_backbone(export_dir)
    data = data_for_export(config, data)
    splits = [load_split(data, data.split), load_split(data, data.eval_split)]
    views = [
        IndexedImages(ds, data.image_column, eval_transform(data, as_uint8=False)) for ds in splits
    ]
    labels = [labels_of(ds, data) for ds in splits]
    if labels[0] is None or labels[1] is None:
        raise UserError("evaluation needs labels: set data.label_column")
    opts = ExtractOptions(batch_size, 0, torch.device("cpu"))
    report = {}
    for name, encoder in (("raw pixels", torch.nn.Flatten()), ("pcl backbone", model)):
        feats = [extract_all(encoder, v, Comm(), opts) for v in views]
        ready = [f for f in feats if f is not None]  # one process: every split
        report[name] = representation_scores(ready, [labels[0], labels[1]], k=k)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="options (section.key=default):\n" + describe_options(("data", "eval")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=digits")
    args = parser.parse_args(argv)
    try:
        if not (args.export_dir / "config.json").is_file():
            raise UserError(
                f"{args.export_dir} holds no config.json: pass a run's export directory "
                "(RUN_DIR/export)"
            )
        cfg = load_config(None, args.overrides, command_defaults=EVAL_DEFAULTS)
        validate_eval(cfg)
        report = evaluate_export(args.export_dir, cfg.data, cfg.eval.batch_size)
    except UserError as err:
        print(f"eval/knn.py: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if cfg.eval.json:
        Path(cfg.eval.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
