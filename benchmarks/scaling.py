"""1 vs 2 CPU processes: training throughput and E-step wall time of the same run.

    python benchmarks/scaling.py                 # digits recipe, 3 epochs (1 warm-up)
    python benchmarks/scaling.py --config configs/mnist_10k.yaml --max-steps-per-epoch 30

Each configuration is a real `accelerate launch launch.py` run of the recipe (1 process with 2
threads; 2 gloo processes with 1 thread each, the same global batch), logging every step;
``--max-steps-per-epoch`` shortens the training epochs, not the E-step (every image is embedded
and clustered).
Throughput is the global batch over the median time between consecutive step records (E-steps
and checkpoints fall between epochs and are excluded); the E-step time is what the run logs for
each E-step (extraction, clustering, phi, broadcast).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(procs: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    config = ROOT / "accelerate_configs" / ("cpu_1proc.yaml" if procs == 1 else "cpu_2proc.yaml")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(29600 + procs), str(ROOT / "launch.py"),
        "--config", str(ROOT / args.config),
        f"optim.epochs={args.epochs}", "pcl.warmup_epochs=1", f"optim.batch_size={args.batch_size}",
        "run.log_every=1", "run.evaluate=false", "run.checkpoint_every=1000",
        "data.num_workers=0", f"run.output_dir={out}",
        f"run.max_steps_per_epoch={args.max_steps_per_epoch}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    gaps = [
        b["elapsed_s"] - a["elapsed_s"]
        for a, b in itertools.pairwise(steps)
        if a["epoch"] == b["epoch"]
    ]
    esteps = [r["seconds"] for r in records if r.get("event") == "estep"]
    return {
        "img_s": args.batch_size / statistics.median(gaps),
        "estep_s": statistics.mean(esteps),
        "steps": len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.yaml", help="recipe, from the root")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--max-steps-per-epoch", type=int, default=0, help="training steps per epoch (0 = all)"
    )
    parser.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.batch_size is None:
        from pcl_scale.config import load_config

        args.batch_size = load_config(ROOT / args.config).optim.batch_size
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            results[procs] = run(procs, args, Path(tmp) / f"p{procs}")
    print(
        f"{args.config}, {args.epochs} epochs (1 warm-up), global batch {args.batch_size}, "
        f"{args.threads} threads in all\n"
    )
    print("| processes | training img/s | E-step (s) | steps timed |")
    print("|---|---|---|---|")
    for procs, r in results.items():
        print(f"| {procs} | {r['img_s']:.1f} | {r['estep_s']:.2f} | {r['steps']} |")
    one, two = results[1], results[2]
    print(
        f"\n2 vs 1 process: throughput x{two['img_s'] / one['img_s']:.2f}, "
        f"E-step time x{two['estep_s'] / one['estep_s']:.2f}"
    )


if __name__ == "__main__":
    main()
