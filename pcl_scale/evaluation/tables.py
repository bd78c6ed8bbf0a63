"""Markdown tables of evaluation results, their flat form for logs and model cards, and the
JSON file of ``pcl-scale eval``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def format_report(evaluation: dict[str, dict[str, float]]) -> str:
    """The learned-vs-raw table printed at the end of a run."""
    lines = ["| features | kNN top-1 (k=5) | k-means NMI | k-means AMI |", "|---|---|---|---|"]
    for name, row in evaluation.items():
        knn = f"{row['knn_top1']:.1f}%" if "knn_top1" in row else "-"
        lines.append(f"| {name} | {knn} | {row['nmi']:.3f} | {row['ami']:.3f} |")
    return "\n".join(lines)


def flatten_evaluation(evaluation: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """``{"pcl_backbone/knn_top1": ...}``: one key per (features, metric)."""
    if not evaluation:
        return {}
    return {
        f"{name.replace(' ', '_')}/{k}": v
        for name, row in evaluation.items()
        for k, v in row.items()
    }


def format_evaluation(report: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per metric, one column per encoder."""
    names = list(report)
    keys: list[str] = []
    for row in report.values():
        keys += [k for k in row if k not in keys]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = []
        for name in names:
            v = report[name].get(key, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json_atomic(path: Path, report: dict[str, dict[str, Any]]) -> None:
    """Write ``report`` to ``path`` as JSON through a temporary file in the same directory and
    ``os.replace``: a reader (or an interruption) sees the previous file or the new one, never
    half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
