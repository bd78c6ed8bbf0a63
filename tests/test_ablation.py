"""benchmarks/ablation.py's bookkeeping: finished runs are reused, checked against the recipe, and
summarised per variant (no training here: the runs' reports are written by the test)."""

import json
import subprocess
import sys

import pytest

from pcl_scale.config import load_config, save_config

from .conftest import ROOT

RECIPE = "configs/digits.yaml"


def finished_run(out, variant, seed, ami, extra=()):
    """A run directory as the script leaves it: the trainer's config.yaml and eval's eval.json."""
    run = (out / f"{variant}_seed{seed}").resolve()
    run.mkdir(parents=True)
    args = [*extra, f"run.seed={seed}", f"run.output_dir={run}", "run.evaluate=false"]
    if variant == "infonce":
        args.append(f"pcl.warmup_epochs={load_config(ROOT / RECIPE).optim.epochs}")
    save_config(load_config(ROOT / RECIPE, args), run / "config.yaml")
    scores = dict.fromkeys(("knn5_top1", "knn200_top1", "linear_top1", "kmeans_acc"), 90.0)
    raw = dict(scores, kmeans_nmi=0.5, kmeans_ami=0.5)
    report = {"raw pixels": raw, "pcl backbone": dict(scores, kmeans_nmi=ami, kmeans_ami=ami)}
    if variant == "pcl":
        report["prototypes"] = {"k0_ami": 0.4}
    (run / "eval.json").write_text(json.dumps(report))


def ablation(out, *args):
    script = str(ROOT / "benchmarks" / "ablation.py")
    cmd = [sys.executable, script, "--config", RECIPE, "--out", str(out)]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pcl_only_reuses_runs_and_reports_one_side(tmp_path):
    for seed, ami in ((0, 0.80), (1, 0.84)):
        finished_run(tmp_path, "pcl", seed, ami)
    proc = ablation(tmp_path, "--seeds", "0", "1", "--variants", "pcl")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| raw pixels", "| PCL"]
    pcl = rows[-1].split(" | ")
    assert pcl[5] == f"0.820 +- {0.04 / 2**0.5:.3f}"  # AMI mean +- sample std of 0.80, 0.84
    assert pcl[7].rstrip(" |") == "0.400 +- 0.000"  # prototype AMI
    assert "InfoNCE" not in proc.stdout and "mean difference" not in proc.stdout


def test_both_variants_give_the_per_seed_ami_difference(tmp_path):
    for seed, (p, i) in enumerate(((0.80, 0.70), (0.86, 0.72))):
        finished_run(tmp_path, "pcl", seed, p)
        finished_run(tmp_path, "infonce", seed, i)
    proc = ablation(tmp_path, "--seeds", "0", "1")
    assert proc.returncode == 0, proc.stderr
    assert "per seed: +0.100, +0.140" in proc.stdout
    # mean 0.120 over the larger std (PCL's, 0.06 / sqrt 2)
    assert f"mean difference +0.120 = {0.12 / (0.06 / 2**0.5):.2f} x" in proc.stdout


@pytest.mark.parametrize("variants", [["pcl"], ["pcl", "infonce"]])
def test_a_finished_run_of_another_recipe_is_refused(tmp_path, variants):
    finished_run(tmp_path, "pcl", 0, 0.8, extra=["optim.epochs=5"])
    proc = ablation(tmp_path, "--seeds", "0", "--variants", *variants)
    assert proc.returncode != 0
    assert "holds a finished run of another recipe" in proc.stderr
    assert not (tmp_path / "infonce_seed0").exists()  # nothing trained before the refusal
