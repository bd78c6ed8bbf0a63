"""Scale rehearsal of ``pcl-scale train`` itself on CPU: (N, W), (2N, 2W), (4N, 4W) with gloo.

    python benchmarks/rehearsal_trainer.py                  # N = 50k, 100k, 200k on W = 1, 2, 4
    python benchmarks/rehearsal_trainer.py --n 5000         # a quick run

Writes a synthetic image dataset once (8x8 RGB images around 10 class patterns, a 2,000-image
test split), then trains one epoch of the real trainer at each (N, W) under torchrun: a
ResNet-18 (small stem), the E-step at epoch 0 (``estep.mode=auto``: gather on one process,
sharded on several), a few M-steps, the kNN check (``run.knn_every=1``), the resume checkpoint,
the final evaluation (kNN and k-means, learned and raw pixels) and the export. K stays fixed, as
it does when a dataset grows.

Per configuration it prints, from the run's own ``metrics.jsonl``, every waiting phase's seconds
and ``rank0_alone_s`` (rank 0's work after every other rank had finished it), and per rank the
peak resident memory the run added over the libraries (``benchmarks/rehearsal_rank.py``). Then
the ratios side by side: per-rank memory at (2N, 2W) over (N, W), and rank-0-alone seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = 10
PHASES = ("estep", "knn", "checkpoint", "evaluation", "export")


def write_dataset(path: Path, n: int, queries: int, seed: int = 0) -> Path:
    """A save_to_disk DatasetDict: ``n`` training and ``queries`` test images with labels."""
    import datasets

    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(CLASSES, 8, 8, 3))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=CLASSES)}
    )

    def split(count: int, offset: int) -> Any:
        def rows() -> Any:
            local = np.random.default_rng(seed + 1 + offset)
            for start in range(0, count, 10_000):
                labels = np.arange(start, min(count, start + 10_000)) % CLASSES
                noise = local.normal(0, 40, size=(len(labels), 8, 8, 3))
                images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
                for image, label in zip(images, labels, strict=True):
                    yield {"image": image, "label": int(label)}

        return datasets.Dataset.from_generator(rows, features=features)

    datasets.DatasetDict({"train": split(n, 0), "test": split(queries, 1)}).save_to_disk(str(path))
    return path


def overrides(data: Path, run_dir: Path, n: int, world: int) -> list[str]:
    settings = {
        "data.source": data, "data.max_samples": n, "data.eval_split": "test",
        "data.image_size": 8, "data.resize_size": 8, "data.num_workers": 0,
        "model.backbone": "resnet18", "model.small_stem": "true", "model.dim": 128,
        "pcl.num_clusters": "[100,200]", "pcl.r": 16, "pcl.queue_size": 256,
        "pcl.warmup_epochs": 0, "estep.backend": "torch", "estep.niter": 10, "estep.nredo": 1,
        "estep.batch_size": 512, "optim.epochs": 1, "optim.batch_size": 16 * world,
        "run.max_steps_per_epoch": 5, "run.knn_every": 1, "run.evaluate": "true",
        "run.output_dir": run_dir,
    }  # fmt: skip
    return [f"{key}={value}" for key, value in settings.items()]


def train(data: Path, work: Path, n: int, world: int, port: int) -> dict[str, Any]:
    """One rehearsal run under torchrun; its phase records and per-rank memory."""
    run_dir = work / f"run_{n}_{world}"
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--master_port", str(port), str(HERE / "rehearsal_rank.py"), str(run_dir), "train",
        *overrides(data, run_dir, n, world),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world)), "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run N={n} W={world} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"]: r for r in records if r.get("event") == "phase"}
    memory = [json.loads((run_dir / f"memory_rank{r}.json").read_text()) for r in range(world)]
    estep = next(r for r in records if r.get("event") == "estep")
    evaluation = next(r for r in records if r.get("event") == "evaluation")
    return {"phases": phases, "memory": memory, "mode": estep["mode"], "evaluation": evaluation}


def added_mb(run: dict[str, Any]) -> float:
    """The most resident memory any rank added over its libraries."""
    return max(m["peak_mb"] - m["baseline_mb"] for m in run["memory"])


def report(configs: list[tuple[int, int]], runs: list[dict[str, Any]]) -> None:
    print("| N | W | E-step mode | " + " | ".join(f"{p} s (rank 0 alone)" for p in PHASES)
          + " | peak added per rank (MB) |")  # fmt: skip
    print("|---" * (len(PHASES) + 4) + "|")
    for (n, w), run in zip(configs, runs, strict=True):
        cells = [
            f"{run['phases'][p]['seconds']:.2f} ({run['phases'][p]['rank0_alone_s']:.3f})"
            for p in PHASES
        ]
        print(f"| {n:,} | {w} | {run['mode']} | " + " | ".join(cells) + f" | {added_mb(run):.0f} |")
    print("\nratios (2N, 2W) / (N, W):")
    for i in range(1, len(configs)):
        (n0, w0), (n1, w1) = configs[i - 1], configs[i]
        ratio = added_mb(runs[i]) / added_mb(runs[i - 1])
        line = f"  ({n1}, {w1}) / ({n0}, {w0}): per-rank memory x{ratio:.2f}"
        for p in PHASES:
            before = runs[i - 1]["phases"][p]["rank0_alone_s"]
            after = runs[i]["phases"][p]["rank0_alone_s"]
            line += f"; {p} rank-0-alone {before:.3f} -> {after:.3f} s"
        print(line)
    knn = {f"N={n},W={w}": round(r["evaluation"]["pcl_backbone/knn_top1"], 2)
           for (n, w), r in zip(configs, runs, strict=True)}  # fmt: skip
    print(f"\nfinal kNN top-1 (%), a check that every run did the work: {knn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="N at the first W (doubled with W)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--queries", type=int, default=2_000)
    args = parser.parse_args()
    configs = [(args.n * w // args.worlds[0], w) for w in args.worlds]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = write_dataset(Path(tmp) / "data", max(n for n, _ in configs), args.queries)
        print(f"dataset: {time.perf_counter() - t0:.1f} s", flush=True)
        runs = []
        for i, (n, w) in enumerate(configs):
            t0 = time.perf_counter()
            runs.append(train(data, Path(tmp), n, w, 29600 + i))
            print(f"N = {n}, W = {w}: {time.perf_counter() - t0:.1f} s", flush=True)
    report(configs, runs)


if __name__ == "__main__":
    main()
