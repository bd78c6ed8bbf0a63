"""E-step benchmark: extraction vs raw inference, clustering per mode and backend, and phi.

CPU (default; 2 processes of 1 thread each are compared with 1 process of 2 threads):

    python benchmarks/estep.py                             # N = 200,000, K = 1,000/2,000/4,000
    python benchmarks/estep.py --n 50000 --extract-n 4096  # quicker

GPU variant (one GPU; N = 1,281,167 unit vectors, K = 25k/50k/100k, 20 iterations, torch backend
with the fused Triton assignment (float16 products, and TF32 for comparison), the same without
it, and faiss-gpu when installed; no extraction part):

    python benchmarks/estep.py --device cuda --n 1281167 --ks 25000 50000 100000 --extract-n 0

Extraction runs the E-step's own code path (strided shard, DataLoader, index bookkeeping,
gather by index) over synthetic images; "raw inference" runs the same encoder over the same
images already batched in memory. Clustering times are for all granularities together; phi is
timed separately. The E-step total is N / extraction rate + clustering + phi (with ``--extract-n``
below N the extraction rate is measured on that many images), and the clustering share is
(clustering + phi) / total. In the 2-process rows the E-step is split across two gloo processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import Dataset

import pcl_scale.core.kmeans as kmeans_module
from pcl_scale.core.concentration import concentration
from pcl_scale.core.kmeans import Backend, KMeansOptions, faiss_available, granularity_seed, kmeans
from pcl_scale.core.model import BackboneSpec, PCLModel
from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.estep import ClusteringPlan, cluster_sharded
from pcl_scale.distributed.extract import ExtractOptions, extract_all, gather_by_index


class SyntheticImages(Dataset):
    """Deterministic random images, returned with their index like ``IndexedImages``."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i


def unit_vectors(n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(1000, d, generator=g), dim=1)
    x = centres[torch.randint(1000, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def extraction(args: argparse.Namespace, comm: Comm, device: torch.device) -> dict[str, float]:
    model = PCLModel(BackboneSpec("resnet18", small_stem=True), queue_size=8).to(device).eval()
    data = SyntheticImages(args.extract_n, args.image_size)
    opts = ExtractOptions(args.batch_size, 0, device)
    comm.barrier()
    t0 = time.perf_counter()
    extract_all(model.embed, data, comm, opts)
    comm.barrier()
    t_extract = time.perf_counter() - t0
    mine = list(range(comm.rank, len(data), comm.world_size))
    batches = [
        torch.stack([data[i][0] for i in mine[s : s + args.batch_size]])
        for s in range(0, len(mine), args.batch_size)
    ]
    comm.barrier()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model.embed(b.to(device))
    sync(device)
    comm.barrier()
    t_raw = time.perf_counter() - t0
    return {"extract_img_s": len(data) / t_extract, "raw_img_s": len(data) / t_raw}


def clustering(
    args: argparse.Namespace,
    comm: Comm,
    device: torch.device,
    mode: str,
    backend: Backend,
    borrow: bool = True,
) -> dict[str, float]:
    """Time one mode/backend; in ``gather`` mode rank 0 clusters with the threads of the ranks
    that wait (as the E-step does), or with its own only when ``borrow`` is False."""
    x = unit_vectors(args.n, args.d)
    index = torch.arange(comm.rank, args.n, comm.world_size)
    local = x[index].to(device)
    kw: dict[str, Any] = {"niter": args.niter, "nredo": 1, "spherical": False, "seed": 0}
    comm.barrier()
    sync(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if mode == "sharded":
        cluster_sharded(
            index, local, args.n, comm, ClusteringPlan(tuple(args.ks), 0.2, KMeansOptions(**kw))
        )
        t_phi = float("nan")  # included: phi is computed from all-reduced statistics in the loop
    else:
        full = gather_by_index(index, local.cpu(), args.n, comm)
        t_phi = 0.0
        if full is not None:
            full = full.to(device)
            with comm.idle_host_threads() if borrow else contextlib.nullcontext():
                for m, k in enumerate(args.ks):
                    seed = granularity_seed(0, m)  # as the E-step seeds granularity m
                    res = kmeans(full, k, backend=backend, **{**kw, "seed": seed})
                    sync(device)
                    t1 = time.perf_counter()
                    concentration(res.distances, res.assignments, k, 0.2)
                    sync(device)
                    t_phi += time.perf_counter() - t1
        comm.barrier()
    sync(device)
    out = {"cluster_s": time.perf_counter() - t0, "phi_s": t_phi}
    cpu = comm.all_gather_object(time.process_time() - cpu0)
    if mode == "gather" and comm.world_size > 1:  # CPU time the waiting ranks used meanwhile
        out["waiting_cpu_s"] = max(float(c) for c in cpu[1:])  # type: ignore[arg-type]
    return out


def run(args: argparse.Namespace, comm: Comm) -> dict[str, Any]:
    device = torch.device(args.device)
    out: dict[str, Any] = {"world": comm.world_size}
    if args.extract_n:
        out.update(extraction(args, comm, device))
    if device.type == "cuda":  # compile the fused kernel, outside the timings
        t0 = time.perf_counter()
        clustering(
            argparse.Namespace(**{**vars(args), "niter": 1}), comm, device, "gather", "torch"
        )
        print(
            f"first-call kernel compilation (not timed below): {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    backends: list[Backend] = ["torch", "faiss"] if faiss_available() else ["torch"]
    for backend in backends:
        out[f"gather/{backend}"] = clustering(args, comm, device, "gather", backend)
    if comm.world_size > 1 and args.rank0_alone:
        for backend in backends:
            out[f"gather/{backend} (rank 0's thread only)"] = clustering(
                args, comm, device, "gather", backend, borrow=False
            )
    if comm.world_size > 1 or args.device == "cuda":
        out["sharded/torch"] = clustering(args, comm, device, "sharded", "torch")
    if args.device == "cuda" and kmeans_module.fused_assign_available():
        from pcl_scale.core import kmeans_triton

        default, kmeans_triton.PRECISION = kmeans_triton.PRECISION, "tf32"  # for comparison
        try:
            out["sharded/torch (TF32 kernel)"] = clustering(args, comm, device, "sharded", "torch")
        finally:
            kmeans_triton.PRECISION = default
    if args.device == "cuda" and kmeans_module.fused_assign_available() and not args.skip_chunked:
        kmeans_module.USE_FUSED_ASSIGN = False  # the chunked product + minimum, for comparison
        try:
            out["gather/torch (chunked, no fused kernel)"] = clustering(
                args, comm, device, "gather", "torch"
            )
        finally:
            kmeans_module.USE_FUSED_ASSIGN = True
    return out


def _worker(rank: int, args: argparse.Namespace, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # as torchrun and accelerate launch set it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = run(args, Comm())
        if rank == 0:
            Path(result_file).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def print_rows(results: list[dict[str, Any]], ks: list[int], n: int) -> None:
    """One row per mode/backend; the total is N / extraction rate + clustering + phi."""
    print(f"K = {', '.join(f'{k:,}' for k in ks)} (all granularities together)\n")
    print(
        "| processes | extraction img/s | raw inference img/s | ratio | mode/backend |"
        " clustering (s) | phi (s) | E-step total (s) | clustering share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ext = r.get("extract_img_s")
        raw = r.get("raw_img_s")
        for key, val in r.items():
            if "/" not in key:
                continue
            in_loop = math.isnan(val["phi_s"])  # sharded: phi is computed inside the loop
            cells = [
                str(r["world"]),
                f"{ext:.0f}" if ext else "-",
                f"{raw:.0f}" if raw else "-",
                f"{ext / raw:.2f}" if ext and raw else "-",
                key,
                f"{val['cluster_s']:.2f}",
                "in clustering" if in_loop else f"{val['phi_s']:.3f}",
            ]
            if ext:
                phi = 0.0 if in_loop else val["phi_s"]
                total = n / ext + val["cluster_s"] + phi
                cells += [f"{total:.1f}", f"{(val['cluster_s'] + phi) / total:.0%}"]
            else:
                cells += ["-", "-"]
            print("| " + " | ".join(cells) + " |")
    waits = [
        f"{key} {val['waiting_cpu_s']:.2f} s over {val['cluster_s']:.1f} s"
        for r in results
        for key, val in r.items()
        if "/" in key and "waiting_cpu_s" in val
    ]
    if waits:
        print("\nCPU time of the waiting rank while rank 0 clustered (gather): " + "; ".join(waits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--extract-n", type=int, default=200_000)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--rank0-alone",
        action="store_true",
        help="2 processes: also time gather mode with rank 0's own thread only",
    )
    parser.add_argument(
        "--skip-chunked", action="store_true", help="GPU: skip the run without the fused kernel"
    )
    args = parser.parse_args()

    results = [run(args, Comm())]
    if args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            result_file = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(args, os.path.join(tmp, "init"), result_file), nprocs=2)
            results.append(json.loads(Path(result_file).read_text()))
    print(
        f"# {args.device}, N={args.n:,}, D={args.d}, niter={args.niter}, "
        f"extraction on {args.extract_n:,} images of {args.image_size} px (ResNet-18 small stem)"
    )
    if 0 < args.extract_n < args.n:
        print(f"E-step total: extraction of all {args.n:,} images at the measured rate")
    print_rows(results, args.ks, args.n)


if __name__ == "__main__":
    main()
