"""benchmarks/ablation.py's bookkeeping: finished runs are reused, existing runs are checked against
the recipe, reports are summarised per variant (the runs' reports written by the test), and an
interrupted run resumes from its checkpoint (one short real run)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pcl_scale.artifacts import PREFIX
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


def ablation_cmd(out, *args):
    script = str(ROOT / "benchmarks" / "ablation.py")
    return [sys.executable, script, "--config", RECIPE, "--out", str(out), *args]


def ablation(out, *args, timeout=120):
    cmd = ablation_cmd(out, *args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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


def test_checkpoint_and_logging_cadence_are_not_part_of_the_recipe(tmp_path):
    finished_run(tmp_path, "pcl", 0, 0.8, extra=["run.checkpoint_every=1", "run.log_every=1"])
    proc = ablation(tmp_path, "run.checkpoint_every=10", "--seeds", "0", "--variants", "pcl")
    assert proc.returncode == 0, proc.stderr  # reused: the same model was trained
    assert "0.800 +- " in proc.stdout
    proc = ablation(tmp_path, "run.knn_every=1", "--seeds", "0", "--variants", "pcl")
    assert "holds a finished run of another recipe" in proc.stderr  # monitoring is not bookkeeping


def test_the_held_out_split_is_not_part_of_the_recipe(tmp_path):
    """A run scored on a validation part of the training split trained the same model."""
    finished_run(tmp_path, "pcl", 0, 0.8)
    proc = ablation(tmp_path, "data.eval_split=train[1200:]", "--seeds", "0", "--variants", "pcl")
    assert proc.returncode == 0, proc.stderr
    assert "0.800 +- " in proc.stdout


def test_an_unfinished_run_of_another_recipe_is_refused_before_any_training(tmp_path):
    finished_run(tmp_path, "pcl", 0, 0.8)
    finished_run(tmp_path, "pcl", 1, 0.8, extra=["optim.lr=0.5"])
    (tmp_path / "pcl_seed1" / "eval.json").unlink()  # stopped before its evaluation
    proc = ablation(tmp_path, "--seeds", "0", "1", "2")
    assert proc.returncode != 0
    assert f"{(tmp_path / 'pcl_seed1').resolve()} holds an unfinished run" in proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("infonce_seed0", "pcl_seed2", "infonce_seed1"):  # checked before training
        assert not (tmp_path / name).exists()


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    tiny = ["optim.epochs=2", "pcl.warmup_epochs=1", "run.checkpoint_every=1",
            "data.max_samples=256", "run.log_every=1"]  # fmt: skip
    args = [*tiny, "--seeds", "0", "--variants", "pcl"]
    first = ablation(tmp_path, *args, timeout=300)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "pcl_seed0"
    straight = json.loads((run / "eval.json").read_text())
    straight_losses = logged_losses(run)
    steps = sorted((run / "checkpoints").iterdir())
    assert len(steps) == 2  # after epoch 1 and at the end
    # as if stopped during the second epoch: no final checkpoint, export or report
    shutil.rmtree(steps[-1])
    shutil.rmtree(run / "export")
    (run / "eval.json").unlink()
    second = ablation(tmp_path, *args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads((run / "eval.json").read_text()) == straight
    # the log gained the second epoch again, with the same losses, and not the first
    second_epoch = [x for x in straight_losses if x[0] == 1]
    assert second_epoch and len(second_epoch) < len(straight_losses)
    assert logged_losses(run) == straight_losses + second_epoch


def logged_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["loss"]) for r in records if "loss" in r]


def test_sigterm_stops_training_at_a_checkpoint_and_says_how_to_resume(tmp_path):
    tiny = ["optim.epochs=20", "data.max_samples=256", "run.log_every=1"]
    cmd = ablation_cmd(tmp_path, *tiny, "--seeds", "0", "--variants", "infonce")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "infonce_seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and '"loss"' in log.read_text()):  # training has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the script alone: it passes the signal on
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "stopped by a signal after saving a checkpoint: run the same command" in stderr
    (saved,) = (tmp_path / "infonce_seed0" / "checkpoints").iterdir()
    assert 0 < int(saved.name.removeprefix(PREFIX)) < 20 * 4  # mid-run (4 steps per epoch)
    assert not (tmp_path / "infonce_seed0" / "export").exists()
