"""kNN accuracy and k-means NMI/AMI of a published pcl-scale export on a labelled dataset.

    python eval/knn.py runs/digits/export --source digits --split train --eval-split test

The export directory is what a run writes (``model.safetensors`` + ``config.json``); the model is
rebuilt with plain torchvision/timm. The kNN gallery is ``--split``, the queries ``--eval-split``
(k = 5, cosine, majority vote); k-means (K = number of classes) runs on both splits together.
Raw pixels of the same view are reported next to the learned features, by the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pcl_scale.config import DataConfig
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.distributed import Comm
from pcl_scale.errors import UserError
from pcl_scale.estep import ExtractOptions, extract_all
from pcl_scale.evaluation import data_for_export
from pcl_scale.export import load_exported_backbone
from pcl_scale.metrics import representation_scores
from pcl_scale.train import format_report


def evaluate_export(
    export_dir: Path,
    data: DataConfig,
    split: str,
    eval_split: str,
    batch_size: int = 256,
    k: int = 5,
) -> dict[str, dict[str, float]]:
    model, config = load_exported_backbone(export_dir)
    data = data_for_export(config, data)
    splits = [load_split(data, split), load_split(data, eval_split)]
    views = [IndexedImages(ds, data.image_column, eval_transform(data)) for ds in splits]
    labels = [labels_of(ds, data) for ds in splits]
    if labels[0] is None or labels[1] is None:
        raise UserError("evaluation needs labels: set --label-column")
    opts = ExtractOptions(batch_size, 0, torch.device("cpu"))
    report = {}
    for name, encoder in (("raw pixels", torch.nn.Flatten()), ("pcl backbone", model)):
        feats = [extract_all(encoder, v, Comm(), opts) for v in views]
        ready = [f for f in feats if f is not None]  # one process: every split
        report[name] = representation_scores(ready, [labels[0], labels[1]], k=k)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--source", required=True, help="data source, as data.source")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--resize-size", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if not (args.export_dir / "config.json").is_file():
        print(
            f"eval/knn.py: error: {args.export_dir} holds no config.json: pass a run's export "
            f"directory (RUN_DIR/export)",
            file=sys.stderr,
        )
        return 2
    data = DataConfig(
        source=args.source,
        image_column=args.image_column,
        label_column=args.label_column,
        resize_size=args.resize_size,
    )
    try:
        report = evaluate_export(
            args.export_dir, data, args.split, args.eval_split, args.batch_size
        )
    except UserError as err:
        print(f"eval/knn.py: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
