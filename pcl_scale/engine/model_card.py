"""The export's model card: Hub metadata, how to load it, its evaluation and the citation.

Built with ``huggingface_hub``'s ``ModelCard``, so the YAML header is the Hub's own (it indexes
``library_name``, ``pipeline_tag``, ``tags``, ``datasets`` and ``license``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CITATION = """@inproceedings{li2021prototypical,
  title     = {Prototypical Contrastive Learning of Unsupervised Representations},
  author    = {Li, Junnan and Zhou, Pan and Xiong, Caiming and Hoi, Steven C. H.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}"""
BUILTIN_SOURCES = ("digits", "mnist")


def model_card(timm_cfg: dict[str, Any], pcl_cfg: dict[str, Any], name: str) -> ModelCard:
    """The card of an export whose ``config.json`` is ``timm_cfg`` and ``pcl_config.json``
    ``pcl_cfg``."""
    run = pcl_cfg["training_config"]
    loads_in_timm = pcl_cfg["loader"]["timm"]
    data = ModelCardData(
        library_name="timm" if loads_in_timm else "pytorch",
        pipeline_tag="image-feature-extraction",
        license=run["run"]["license"],
        tags=[
            "image-feature-extraction",
            "self-supervised-learning",
            "prototypical-contrastive-learning",
            "pcl-scale",
            "timm" if loads_in_timm else "torchvision",
        ],
        datasets=_hub_dataset(run["data"]["source"]),
        model_name=name,
    )
    sections = [
        f"# {name}",
        _summary(timm_cfg, pcl_cfg),
        "## How to use",
        _loading(timm_cfg, pcl_cfg),
        "## Evaluation",
        _evaluation_table(pcl_cfg["evaluation"]),
        "## Citation",
        f"```bibtex\n{CITATION}\n```",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n"
                                   + "\n\n".join(sections) + "\n")  # fmt: skip


def _hub_dataset(source: str) -> list[str] | None:
    """The training data as a Hub dataset id, when it is one (not a path or a built-in)."""
    looks_local = (
        source.startswith(("/", ".", "~"))
        or any(c in source for c in "*?[")
        or Path(source).exists()
    )
    if source in BUILTIN_SOURCES or looks_local or source.count("/") != 1:
        return None
    return [source]


def _summary(timm_cfg: dict[str, Any], pcl_cfg: dict[str, Any]) -> str:
    run = pcl_cfg["training_config"]
    size = pcl_cfg["image_size"]
    return "\n".join(
        [
            f"A `{timm_cfg['architecture']}` backbone trained without labels by Prototypical "
            f"Contrastive Learning (Li et al., ICLR 2021) with pcl-scale "
            f"{pcl_cfg['pcl_scale_version']}. Its output is the pooled "
            f"{pcl_cfg['num_features']}-dimensional feature (the projection head to "
            f"{pcl_cfg['embedding_dim']} dimensions is in `head.safetensors`).",
            "",
            f"- Training data: `{run['data']['source']}` (split `{run['data']['split']}`)",
            f"- Epochs: {run['optim']['epochs']}, global batch {run['optim']['batch_size']}, "
            f"clusters per granularity {run['pcl']['num_clusters']}, head `{pcl_cfg['head']}`",
            f"- Input: {size} x {size} RGB, normalised with mean {pcl_cfg['mean']} and std "
            f"{pcl_cfg['std']} (`config.json`'s `pretrained_cfg`)",
            "- Training config: `pcl_config.json`",
        ]
    )


def _loading(timm_cfg: dict[str, Any], pcl_cfg: dict[str, Any]) -> str:
    torchvision = pcl_cfg["loader"].get("torchvision")
    parts = []
    if pcl_cfg["loader"]["timm"]:
        parts.append(
            "With timm (`local-dir:` for a downloaded folder, `hf-hub:ORG/NAME` from the Hub):\n\n"
            "```python\nimport timm\n\n"
            'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)\n"
            "transform = timm.data.create_transform(**config)\n"
            "features = model(transform(image).unsqueeze(0))  # (1, "
            f"{pcl_cfg['num_features']})\n```"
        )
    else:
        parts.append(
            "This ResNet has the small-image stem (a 3x3 stride-1 `conv1` and no max-pool), which "
            "timm's ResNet cannot express: load it with torchvision."
        )
    if torchvision is not None:
        stem = (
            "model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)\nmodel.maxpool = nn.Identity()\n"
            if torchvision["small_stem"]
            else ""
        )
        parts.append(
            "With torchvision:\n\n```python\nimport torchvision\n"
            "from safetensors.torch import load_file\nfrom torch import nn\n\n"
            f"model = torchvision.models.{torchvision['architecture']}()\n{stem}"
            "model.fc = nn.Identity()\n"
            'model.load_state_dict(load_file("model.safetensors"))\n```'
        )
    return "\n\n".join(parts)


def _evaluation_table(metrics: dict[str, Any]) -> str:
    """``{"pcl_backbone/knn_top1": 0.96, ...}`` as a table: features by metric."""
    if not metrics:
        return "No evaluation was run with this export."
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        features, _, metric = key.partition("/")
        rows.setdefault(features.replace("_", " "), {})[metric] = value
    columns = list(dict.fromkeys(m for row in rows.values() for m in row))
    lines = [
        "| features | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for features, row in rows.items():
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append(f"| {features} | " + " | ".join(cells) + " |")
    return "From the end of training (the trainer's table):\n\n" + "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
