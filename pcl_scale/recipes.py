"""The recipes shipped inside the package (``pcl_scale/configs/NAME.yaml``), found by name.

``--config`` takes a YAML file or a recipe name, so ``pcl-scale train --config mnist_10k`` works
from any directory of any install. An existing file always wins; otherwise ``NAME``,
``NAME.yaml`` and ``configs/NAME.yaml`` (the checkout's layout before the recipes moved into the
package, still in docs, scripts and shell histories; any folder named ``configs``) name the
packaged recipe ``NAME``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11; annotations only
    from importlib.resources.abc import Traversable

RECIPES_FOLDER = "configs"  # inside the pcl_scale package
DEFAULT_RECIPE = "digits"  # what `pcl-scale train` runs without --config


def _folder() -> Traversable:
    return resources.files("pcl_scale").joinpath(RECIPES_FOLDER)


def recipe_names() -> list[str]:
    """The packaged recipes, sorted."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in _folder().iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    )


def find_recipe(spec: str | Path) -> Traversable | None:
    """The YAML ``spec`` denotes: the file itself, else the packaged recipe it names, else None."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    checkout_configs = Path(__file__).resolve().parent.parent / RECIPES_FOLDER  # old recipe paths
    bare = path.parent in (Path("."), Path(RECIPES_FOLDER)) or path.parent == checkout_configs
    if not bare or path.suffix not in ("", ".yaml"):
        return None
    name = path.name.removesuffix(".yaml")
    return _folder().joinpath(f"{name}.yaml") if name in recipe_names() else None
