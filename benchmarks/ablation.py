"""Quality ablation: PCL vs the same run with ProtoNCE off (InfoNCE only), several seeds.

    python benchmarks/ablation.py --config configs/digits.yaml --source digits --seeds 0 1 2

For each seed, the recipe is trained twice with an identical budget: as configured (PCL), and
with ``pcl.warmup_epochs`` equal to the number of epochs (no E-step, InfoNCE only, i.e. MoCo).
Each export is evaluated by ``pcl-scale eval`` (kNN, linear probe, k-means NMI/AMI/ACC on the
recipe's train and test splits) and, for PCL, the prototypes' own AMI (coarsest granularity,
the last E-step's assignments of the training split).
The table gives mean +- std over seeds, with raw pixels from the same code, then the per-seed
AMI difference PCL - InfoNCE. A run whose eval.json exists is reused, and an unfinished one is
trained with ``run.resume=auto`` (from its newest intact checkpoint: the periodic ones, or the one
the trainer writes when stopped by SIGINT/SIGTERM), so an interrupted ablation continues where it
stopped; delete a run directory to redo it. Before anything is trained, every run directory that
already holds a configuration is checked against the recipe, and one of another recipe is
refused (checkpoint, export and logging cadence are not part of the recipe). ``--variants pcl``
trains and reports one side only (a longer recipe's expected numbers without paying for its
baseline); the AMI difference then needs both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pcl_scale.cli import EXIT_INTERRUPTED
from pcl_scale.config import Config, EvalConfig, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("knn5_top1", "knn200_top1", "linear_top1", "kmeans_nmi", "kmeans_ami", "kmeans_acc")


def cli(*args: str) -> None:
    """Run ``pcl-scale``; a SIGINT/SIGTERM lets a training run save its checkpoint and stop."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pcl_scale.cli", *args], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # Ctrl-C reaches the whole process group; a SIGTERM sent to this script alone is passed on
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        returncode = None
        try:
            while returncode is None:  # on Ctrl-C, wait for the trainer's checkpoint
                with contextlib.suppress(KeyboardInterrupt):
                    returncode = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        log.seek(0)
        output = log.read()
    if returncode == EXIT_INTERRUPTED:
        raise SystemExit(
            f"pcl-scale {args[0]} was stopped by a signal after saving a checkpoint: run the same "
            "command again to resume"
        )
    if returncode != 0:
        raise SystemExit(f"pcl-scale {args[0]} failed:\n{output[-3000:]}")


# What a run writes when, not what it computes: runs that differ only here train the same model.
BOOKKEEPING = ("resume", "checkpoint_every", "checkpoint_every_steps", "keep_checkpoints",
               "export_every", "log_every", "trackers", "hub_repo_id", "hub_private",
               "license")  # fmt: skip


def recipe_of(cfg: Config) -> Config:
    """The configuration without the run's bookkeeping (``BOOKKEEPING``) and held-out split: a
    run resumed, checkpointed and logged at another cadence, or scored elsewhere, trains the same
    recipe."""
    defaults = RunConfig()
    blank = {name: getattr(defaults, name) for name in BOOKKEEPING}
    data = dataclasses.replace(cfg.data, eval_split="")  # what a run is scored on, not trained on
    run = dataclasses.replace(cfg.run, **blank)
    return dataclasses.replace(cfg, data=data, run=run, eval=EvalConfig())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--source", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument(
        "--variants", nargs="+", choices=("pcl", "infonce"), default=["pcl", "infonce"]
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for both variants")
    args = parser.parse_args()

    recipe = load_config(ROOT / args.config, args.overrides)
    epochs, max_samples = recipe.optim.epochs, recipe.data.max_samples
    # scored on the recipe's held-out rows (e.g. data.eval_split='train[50000:]', a validation
    # part of the training split) when it names them, else on pcl-scale eval's default split
    splits = [f"data.split={recipe.data.split}"]
    splits += [f"data.eval_split={recipe.data.eval_split}"] if recipe.data.eval_split else []
    rows: dict[str, list[dict[str, float]]] = {"pcl": [], "infonce": [], "raw": []}
    variants = [v for v in ("pcl", "infonce") if v in args.variants]
    plan = []
    for seed in args.seeds:
        for variant in variants:
            run = (args.out / f"{variant}_seed{seed}").resolve()
            # the evaluation below replaces the trainer's own end-of-run report
            train_args = [*args.overrides, f"run.seed={seed}", f"run.output_dir={run}",
                          "run.evaluate=false", "run.resume=auto"]  # fmt: skip
            if variant == "infonce":  # no E-step: MoCo v2 with the same budget
                train_args.append(f"pcl.warmup_epochs={epochs}")
            saved = run / "config.yaml"
            wanted = recipe_of(load_config(ROOT / args.config, train_args))
            if saved.exists() and recipe_of(load_config(saved)) != wanted:
                state = "a finished" if (run / "eval.json").exists() else "an unfinished"
                raise SystemExit(
                    f"{run} holds {state} run of another recipe or overrides: delete it or "
                    "pass a different --out"
                )
            plan.append((seed, variant, run, train_args))
    for seed, variant, run, train_args in plan:
        report = run / "eval.json"
        if not report.exists():
            cli("train", "--config", args.config, *train_args)
            proto = [f"eval.run_dir={run}"] if variant == "pcl" else []
            cli("eval", str(run / "export"), f"data.source={args.source}",
                "eval.protocols=[knn,linear,cluster]", f"eval.json={report}",
                f"data.max_samples={max_samples}", *splits, *proto)  # fmt: skip
        result = json.loads(report.read_text())
        row = dict(result["pcl backbone"])
        if "prototypes" in result:  # the coarsest granularity (the recipe's first K)
            row["prototype_ami"] = result["prototypes"]["k0_ami"]
        rows[variant].append(row)
        if variant == variants[0]:  # raw pixels: the same eval views, once per seed
            rows["raw"].append(result["raw pixels"])
        print(f"seed {seed} {variant}: " + json.dumps({k: row[k] for k in METRICS}), flush=True)
    print(f"\n{args.config} on {args.source}, seeds {args.seeds}: mean +- std\n")
    cols = (*METRICS, "prototype_ami")
    print("| features | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    names = {"raw": "raw pixels", "infonce": "InfoNCE only", "pcl": "PCL"}
    for key in ("raw", "infonce", "pcl"):
        if not rows[key]:
            continue
        cells = []
        for col in cols:
            values = [r[col] for r in rows[key] if col in r]
            if not values:
                cells.append("-")
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {std:.3f}")
        print(f"| {names[key]} | " + " | ".join(cells) + " |")
    if not (rows["pcl"] and rows["infonce"]):
        return
    pairs = zip(rows["pcl"], rows["infonce"], strict=True)
    diffs = [p["kmeans_ami"] - i["kmeans_ami"] for p, i in pairs]
    print("\nk-means AMI, PCL - InfoNCE only, per seed: " + ", ".join(f"{d:+.3f}" for d in diffs))
    if len(diffs) > 1:
        std = max(statistics.stdev(r["kmeans_ami"] for r in rows[k]) for k in ("pcl", "infonce"))
        gap = statistics.mean(diffs)
        ratio = gap / std if std else float("inf")
        print(f"mean difference {gap:+.3f} = {ratio:.2f} x the larger of the two std")


if __name__ == "__main__":
    main()
