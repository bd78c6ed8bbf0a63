"""Scale rehearsal on CPU: per-rank memory and rank-0-alone seconds at (N, W), (2N, 2W), (4N, 4W).

    python benchmarks/rehearsal.py                       # N = 50k, 100k, 200k on W = 1, 2, 4
    python benchmarks/rehearsal.py --n 20000 --dim 64    # a quick run

Each configuration runs the phases of an epoch boundary that the trainer runs with W gloo
processes: the E-step's sharded extraction (a tiny linear encoder over synthetic inputs, built by
dataset index), the sharded k-means and phi at two granularities, the resume checkpoint of the
cluster result (each rank writes its 1/W), and the sharded evaluation (kNN of a fixed query split
against the training shards, k-means scores). Per phase it prints each rank's seconds, the
seconds rank 0 worked while every other rank waited for it (the shortest wait of the other
ranks in the barrier that ends the phase), the per-rank peak memory added over the start
(``ru_maxrss``), and the most memory a rank held at the end of a phase.

Ratios, side by side in one run: per-rank peak memory at (2N, 2W) over (N, W), and rank-0-alone
seconds at (2N, 2W) over (N, W) from W = 2 on (with one process nobody waits). A phase whose work
on rank 0 grows with N shows a ratio near 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import Dataset

from pcl_scale.artifacts import write_cluster_part
from pcl_scale.core.kmeans import KMeansOptions
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.estep import ClusteringPlan, cluster_sharded
from pcl_scale.distributed.extract import ExtractOptions, extract_shard
from pcl_scale.evaluation.sharded import Shard, sharded_kmeans_scores, sharded_knn_scores

CLASSES = 10


class SyntheticInputs(Dataset):
    """Inputs (F,) around one of 10 class centres, deterministic by index, with the index.

    ``offset`` draws other noise around the same centres (a query split).
    """

    def __init__(self, n: int, width: int, offset: int = 0) -> None:
        self.n, self.width, self.offset = n, width, offset
        self.centres = torch.randn(CLASSES, width, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.offset + i)
        return self.centres[i % CLASSES] + torch.randn(self.width, generator=g), i


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, comm: Comm, fn: Any, out: dict[str, Any]) -> Any:
    """Run ``fn`` on every rank; record its seconds and the wait in the closing barrier."""
    comm.barrier()
    t0 = time.perf_counter()
    result = fn()
    t1 = time.perf_counter()
    comm.barrier()
    out[name] = {"seconds": t1 - t0, "wait": time.perf_counter() - t1, "rss_mb": rss_mb()}
    return result


def run_phases(args: argparse.Namespace, n: int, comm: Comm, tmp: str) -> dict[str, Any]:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(args.width, args.dim)
    data = SyntheticInputs(n, args.width)
    queries = SyntheticInputs(args.queries, args.width, offset=10**9)
    opts = ExtractOptions(batch_size=1024, num_workers=0, device=torch.device("cpu"))
    plan = ClusteringPlan((args.k, 2 * args.k), 0.2, KMeansOptions(niter=args.niter), "sharded")
    times: dict[str, Any] = {}
    start_rss = rss_mb()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(encoder(x), dim=1)

    index, feats = phase("extract", comm, lambda: extract_shard(embed, data, comm, opts), times)
    clusters = phase("cluster", comm, lambda: cluster_sharded(index, feats, n, comm, plan), times)

    def checkpoint() -> None:  # as the resume checkpoint: every rank writes its 1/W
        write_cluster_part(Path(tmp), clusters, comm.rank, comm.world_size)

    phase("checkpoint", comm, checkpoint, times)

    def evaluate() -> dict[str, float]:
        q_index, q_feats = extract_shard(embed, queries, comm, opts)
        gallery = Shard(feats, index, index % CLASSES)
        query = Shard(q_feats, q_index, q_index % CLASSES)
        row = sharded_knn_scores(gallery, query, CLASSES, comm)
        options = KMeansOptions(niter=args.niter, nredo=1, init="kmeans++")
        row.update(sharded_kmeans_scores([gallery], [n], CLASSES, comm, 0, options))
        return row

    scores = phase("evaluate", comm, evaluate, times)
    held = max(t["rss_mb"] for t in times.values()) - start_rss
    return {"times": times, "peak_added_mb": peak_mb() - start_rss, "held_mb": held,
            "scores": scores}  # fmt: skip


def _worker(rank: int, args: argparse.Namespace, n: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = run_phases(args, n, Comm(), os.path.dirname(out))
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(result, fh)
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(args: argparse.Namespace, n: int, world: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(args, n, world, os.path.join(tmp, "init"), out), nprocs=world)
        results = []
        for r in range(world):
            with open(f"{out}.{r}") as fh:
                results.append(json.load(fh))
        return results


def alone_seconds(results: list[dict[str, Any]], name: str) -> float:
    """Seconds rank 0 worked after every other rank had finished the phase."""
    waits = [r["times"][name]["wait"] for r in results[1:]]
    return min(waits) if waits else float("nan")


def peak(results: list[dict[str, Any]], key: str = "peak_added_mb") -> float:
    return max(r[key] for r in results)


def report(configs: list[tuple[int, int]], runs: list[list[dict[str, Any]]]) -> None:
    names = list(runs[0][0]["times"])
    print("| N | W | " + " | ".join(f"{p} s (rank 0 alone)" for p in names)
          + " | peak added per rank (MB) | held after a phase (MB) |")  # fmt: skip
    print("|---" * (len(names) + 4) + "|")
    for (n, w), results in zip(configs, runs, strict=True):
        cells = []
        for p in names:
            slowest = max(r["times"][p]["seconds"] for r in results)
            cells.append(f"{slowest:.2f} ({alone_seconds(results, p):.3f})")
        memory = f" | {peak(results):.0f} | {peak(results, 'held_mb'):.0f} |"
        print(f"| {n} | {w} | " + " | ".join(cells) + memory)
    print("\nratios (2N, 2W) / (N, W):")
    for i in range(1, len(configs)):
        (n0, w0), (n1, w1) = configs[i - 1], configs[i]
        mem = peak(runs[i]) / peak(runs[i - 1])
        held = peak(runs[i], "held_mb") / peak(runs[i - 1], "held_mb")
        line = f"  ({n1}, {w1}) / ({n0}, {w0}): per-rank memory peak x{mem:.2f}, held x{held:.2f}"
        if w0 > 1:
            for p in names:
                before, after = alone_seconds(runs[i - 1], p), alone_seconds(runs[i], p)
                line += f"; {p} rank-0-alone {before:.3f} -> {after:.3f} s"
        print(line)
    knn = {
        f"N={n},W={w}": r[0]["scores"]["knn5_top1"] for (n, w), r in zip(configs, runs, strict=True)
    }
    print(f"\nkNN k=5 top-1 (%), a check that every configuration did the work: {knn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="N at W = 1 (doubled with W)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=64, help="input features")
    parser.add_argument("--dim", type=int, default=128, help="embedding size D")
    parser.add_argument("--k", type=int, default=100, help="K of the first granularity (then 2K)")
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks")
    args = parser.parse_args()
    configs = [(args.n * w // args.worlds[0], w) for w in args.worlds]
    runs = []
    for n, w in configs:
        t0 = time.perf_counter()
        runs.append(measure(args, n, w))
        print(f"N = {n}, W = {w}: {time.perf_counter() - t0:.1f} s", flush=True)
    report(configs, runs)


if __name__ == "__main__":
    main()
