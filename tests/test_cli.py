"""``pcl-scale train``'s recipes: packaged, found by name from any directory, printable."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcl_scale.cli import main
from pcl_scale.config import load_config

from .conftest import ROOT

PACKAGED = (
    "digits",
    "imagenet_resnet50_pcl_v1",
    "imagenet_resnet50_pcl_v2",
    "imagenet_vit_small",
    "mnist",
    "mnist_10k",
    "small_images",
)


def test_recipe_by_name_from_outside_the_checkout(tmp_path):
    """The installed command finds a packaged recipe by name with no checkout in sight."""
    command = Path(sys.executable).parent / "pcl-scale"
    proc = subprocess.run(
        [str(command), "train", "--config", "mnist_10k", "--print-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # printed, nothing trained or written
    printed = yaml.safe_load(proc.stdout)
    assert printed["data"]["max_samples"] == 10000
    assert printed["run"]["output_dir"] == "runs/mnist_10k"


def test_printed_config_loads_back_to_the_same_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ["optim.lr=0.5", "pcl.num_clusters=[10,20]", "data.eval_split=''"]
    assert main(["train", "--config", "digits", "--print-config", *overrides]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = load_config(printed)
    assert again == load_config("digits", overrides)
    assert again.optim.lr == 0.5 and again.data.eval_split == "" and again.data.source == "digits"
    assert not (tmp_path / "runs").exists()


def test_no_config_is_the_packaged_digits_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert main(["train", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(_dump(load_config("digits")))


def _dump(cfg):
    from pcl_scale.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def test_unknown_recipe_exits_2_listing_the_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "mnist_5k", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "'mnist_5k' is neither a file nor a packaged recipe" in err
    for name in PACKAGED:
        assert name in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", PACKAGED)
def test_configs_paths_of_the_old_layout_still_name_the_recipes(name, tmp_path, monkeypatch):
    """README, docs and benchmarks say configs/NAME.yaml (relative, or under the checkout)."""
    monkeypatch.chdir(tmp_path)
    packaged = load_config(name)
    old_layout = ROOT / "configs" / f"{name}.yaml"  # benchmarks' ROOT / args.config
    for spec in (f"configs/{name}.yaml", f"./configs/{name}.yaml", old_layout, f"{name}.yaml"):
        assert load_config(spec) == packaged, spec


def test_an_existing_file_wins_over_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits.yaml").write_text("optim:\n  lr: 0.125\n")
    assert load_config("configs/digits.yaml").optim.lr == 0.125
    assert load_config("digits").optim.lr == 0.06
