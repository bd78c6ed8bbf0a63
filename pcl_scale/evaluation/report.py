"""``pcl-scale report RUN_DIR``: a markdown report with PNG plots of a run.

It reads what a run writes: ``metrics.jsonl`` (loss terms, Acc@Inst/Acc@Proto, lr, kNN events,
E-step records), the newest checkpoint's ``clusters.safetensors`` (cluster sizes and phi per
granularity) and ``embeddings.safetensors`` (a sample of the final backbone features with labels,
mapped to 2-D by PCA, or UMAP when ``umap-learn`` is installed). Plots are drawn with matplotlib
(Agg backend, no display needed) into ``RUN_DIR/report/``, next to ``report.md``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pcl_scale.artifacts import EMBEDDINGS_FILE, METRICS_FILE, find_latest, read_clusters
from pcl_scale.errors import UserError


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} holds no {METRICS_FILE}: pass a run directory (run.output_dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _line_plot(
    path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, title: str
) -> bool:
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _hist_plot(
    path: Path, data: dict[str, torch.Tensor], xlabel: str, title: str, log: bool
) -> bool:
    import matplotlib.pyplot as plt

    if not data:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in data.items():
        ax.hist(values.float().numpy(), bins=50, alpha=0.55, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _embedding_map(path: Path, embeddings: Path) -> str | None:
    import matplotlib.pyplot as plt

    if not embeddings.is_file():
        return None
    state = load_file(str(embeddings))
    x, y = state["features"].float(), state["labels"]
    if importlib.util.find_spec("umap") is not None:
        import umap

        xy = torch.from_numpy(umap.UMAP(random_state=0).fit_transform(x.numpy()))
        method = "UMAP"
    else:
        centred = x - x.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        xy, method = centred @ v[:, :2], "PCA"
    fig, ax = plt.subplots(figsize=(5.5, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y.numpy(), cmap="tab10", s=6)
    ax.set_title(f"{method} of {len(x)} backbone features, coloured by label")
    fig.colorbar(points, ax=ax, label="label")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return method


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    records = _records(run_dir)
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r for r in records if "loss" in r]
    knn = [r for r in records if r.get("event") == "knn"]
    esteps = [r for r in records if r.get("event") == "estep"]
    evaluation = [r for r in records if r.get("event") == "evaluation"]

    def series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
        pairs = [(r[x], r[y]) for r in rows if y in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    sections = [f"# Run report: `{run_dir}`", ""]
    figures = [
        ("loss.png", {k: series(steps, "step", k) for k in ("loss", "loss_inst", "loss_proto")},
         "step", "loss terms"),
        ("accuracy.png", {k: series(steps, "step", k) for k in ("acc_inst", "acc_proto")},
         "step", "Acc@Inst and Acc@Proto (%)"),
        ("lr.png", {"lr": series(steps, "step", "lr")}, "step", "learning rate"),
        ("knn.png", {k: series(knn, "epoch", k) for k in ("knn5_top1", "knn200_top1")},
         "epoch", "kNN top-1 (%) on the held-out split"),
    ]  # fmt: skip
    for name, data, xlabel, title in figures:
        if _line_plot(out / name, data, xlabel, title):
            sections += [f"## {title}", "", f"![{title}]({name})", ""]

    ckpt = find_latest(run_dir)
    clusters = read_clusters(ckpt) if ckpt is not None else None
    if ckpt is not None and clusters is not None:
        sizes, phis = {}, {}
        for c in clusters.clusterings:
            label = f"K={c.num_prototypes}"
            sizes[label] = torch.bincount(c.assignments.long(), minlength=c.num_prototypes)
            phis[label] = c.phi
        title = f"cluster sizes per granularity ({ckpt.name})"
        if _hist_plot(out / "cluster_sizes.png", sizes, "images per cluster", title, log=True):
            sections += [f"## {title}", "", f"![{title}](cluster_sizes.png)", ""]
        title = f"concentration phi per granularity ({ckpt.name})"
        if _hist_plot(out / "phi.png", phis, "phi", title, log=False):
            sections += [f"## {title}", "", f"![{title}](phi.png)", ""]
    method = _embedding_map(out / "embeddings.png", run_dir / EMBEDDINGS_FILE)
    if method:
        sections += [f"## {method} map of the embeddings", "", "![embeddings](embeddings.png)", ""]
    if esteps:
        keys = [k for k in esteps[-1] if k not in ("event",)]
        sections += ["## E-steps", "", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        for r in esteps:
            sections.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
        sections.append("")
    if evaluation:
        sections += ["## Final evaluation", "", "| metric | value |", "|---|---|"]
        for key, value in evaluation[-1].items():
            if key != "event":
                sections.append(f"| {key} | {_cell(value)} |")
        sections.append("")
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
