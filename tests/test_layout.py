"""The package's layers, as imports: core is pure math, distributed sits on core, engine on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pcl_scale"
# what the math may never reach for: collectives and launchers belong to the layers above
FORBIDDEN_IN_CORE = ("torch.distributed", "accelerate", "deepspeed")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source file imports, at any depth, relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y inside package a.b -> a.x (level 1)
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> str | None:
    """The subpackage (``core``, ``distributed``, ...) a pcl_scale module belongs to."""
    parts = module.split(".")
    if parts[0] != "pcl_scale" or len(parts) < 2:
        return None
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "top"


def violations(module: str, source: str) -> list[str]:
    """The import rule broken by ``module`` (a dotted name) with this source."""
    layer = layer_of(module)
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    found = []
    for name in sorted(imported_modules(source, package.removesuffix(".__init__"))):
        target = layer_of(name)
        if layer == "core":
            if name.startswith(FORBIDDEN_IN_CORE):
                found.append(f"{module} imports {name}")
            if name.startswith("pcl_scale.") and target not in ("core", None):
                found.append(f"{module} imports {name} (core imports only core)")
        if layer == "distributed" and target not in ("core", "distributed", None):
            found.append(f"{module} imports {name} (distributed imports only core)")
        if target == "engine" and layer != "engine" and module != "pcl_scale.cli":
            found.append(f"{module} imports {name} (only the cli imports the engine)")
    return found


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


def test_every_layer_is_a_subpackage():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == {
        "core",
        "distributed",
        "engine",
        "evaluation",
    }


@pytest.mark.parametrize("module, path", package_modules(), ids=lambda v: str(v))
def test_import_rule(module, path):
    assert violations(module, path.read_text()) == []


@pytest.mark.parametrize(
    "module, source",
    [
        ("pcl_scale.core.loss", "import torch.distributed as dist"),
        ("pcl_scale.core.loss", "from torch.distributed import all_reduce"),
        ("pcl_scale.core.kmeans", "def f():\n    from accelerate import Accelerator"),
        ("pcl_scale.core.model", "import deepspeed"),
        ("pcl_scale.core.clusters", "from pcl_scale.distributed.comm import Comm"),
        ("pcl_scale.core.clusters", "from ..engine import loop"),
        ("pcl_scale.core.clusters", "from pcl_scale.config import Config"),
        ("pcl_scale.distributed.estep", "from pcl_scale.evaluation.metrics import knn_scores"),
        ("pcl_scale.evaluation.protocols", "from pcl_scale.engine.export import export_backbone"),
        ("pcl_scale.data", "import pcl_scale.engine.loop"),
    ],
)
def test_the_rule_catches_a_broken_layer(module, source):
    assert violations(module, source), source


def test_the_rule_allows_the_layers_below():
    assert not violations("pcl_scale.core.clusters", "from pcl_scale.core.kmeans import kmeans")
    assert not violations("pcl_scale.distributed.estep", "from pcl_scale.core import clusters")
    assert not violations("pcl_scale.cli", "from pcl_scale.engine.loop import train")
    assert not violations("pcl_scale.engine.loop", "import torch.distributed")
