"""The E-step's share of training wall time with ``estep.every`` 1 and 2, on a real recipe.

    python benchmarks/estep_share.py --config configs/mnist_10k.yaml [--epochs 5] [OVERRIDES...]

Runs ``pcl-scale train`` once per value of ``estep.every`` (one after the other, same seed and
recipe, no final evaluation) and reads each run's ``metrics.jsonl``: the E-step phases' seconds
against the run's wall time after the warm-up epochs (from the end of the warm-up to the last
record).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(config: str, every: int, epochs: int, out: Path, extra: list[str]) -> dict[str, float]:
    overrides = [f"estep.every={every}", f"optim.epochs={epochs}", f"run.output_dir={out}",
                 "run.evaluate=false", f"run.checkpoint_every={epochs}", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "pcl_scale.cli", "train", "--config", config, *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    esteps = [r for r in records if r.get("event") == "phase" and r["phase"] == "estep"]
    first = min(r["elapsed_s"] - r["seconds"] for r in esteps)  # the first E-step's start
    wall = records[-1]["elapsed_s"] - first
    seconds = sum(r["seconds"] for r in esteps)
    return {"esteps": len(esteps), "estep_s": seconds, "wall_after_warmup_s": wall,
            "share": seconds / wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/mnist_10k.yaml")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print("| estep.every | E-steps | E-step s | wall after warm-up s | E-step share |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for every in args.every:
            r = run(args.config, every, args.epochs, Path(tmp) / f"every{every}", args.overrides)
            print(f"| {every} | {r['esteps']} | {r['estep_s']:.1f} | "
                  f"{r['wall_after_warmup_s']:.1f} | {r['share']:.1%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
