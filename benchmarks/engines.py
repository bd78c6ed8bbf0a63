"""Training throughput and peak GPU memory of the PCL step per engine, against a bare PyTorch loop.

Each engine runs in its own launch (DeepSpeed needs its own process); every run appends one JSON
line to ``--out``, and ``--report`` prints the table with each engine's ratio to the bare loop:

    OUT=engines.jsonl; ARGS="--backbone resnet50 --image-size 224 --batch-size 128"
    python benchmarks/engines.py --engine bare $ARGS --out $OUT
    accelerate launch --config_file accelerate_configs/gpu_1.yaml \
        benchmarks/engines.py --engine pcl-scale $ARGS --out $OUT
    accelerate launch --config_file accelerate_configs/gpu_1_zero2.yaml \
        benchmarks/engines.py --engine pcl-scale $ARGS --out $OUT
    accelerate launch --config_file accelerate_configs/gpu_1_zero3.yaml \
        benchmarks/engines.py --engine pcl-scale $ARGS --out $OUT
    python benchmarks/engines.py --report $OUT

``pcl-scale`` runs the trainer's own step (:func:`pcl_scale.engine.mstep.train_step`: shuffled-BN
keys, ProtoNCE over 3 granularities, backward, step, enqueue) plus the momentum update, on the
engine the launcher selects; ``bare`` runs the same two-encoder model, loss and optimizer in a plain
loop with torch autocast. Inputs are synthetic batches already on the device, so the data pipeline
is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pcl_scale.artifacts import TrainState
from pcl_scale.config import Config, load_config
from pcl_scale.core.clusters import random_clusters
from pcl_scale.core.loss import PCLLoss
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.checkpoint import Layout
from pcl_scale.engine.runtime import (
    distributed_kind,
    make_accelerator,
    set_deepspeed_batch,
    shutdown,
)


def bench_config(args: argparse.Namespace) -> Config:
    return load_config(
        None,
        [
            f"model.backbone={args.backbone}",
            f"model.small_stem={str(args.image_size <= 64).lower()}",
            "model.head=mlp",
            f"data.image_size={args.image_size}",
            f"optim.batch_size={args.batch_size}",
            "optim.lr=0.0001",
            f"pcl.num_clusters=[{','.join(str(k) for k in args.ks)}]",
            f"pcl.r={args.r}",
            f"pcl.queue_size={args.queue}",
            f"run.mixed_precision={args.precision}",
        ],
    )


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per step over ``iters`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def run_bare(args: argparse.Namespace, cfg: Config) -> tuple[str, float]:
    from pcl_scale.engine.loop import build_model

    device = torch.device(args.device)
    model = build_model(cfg).to(device)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-4, momentum=0.9)
    clusters = random_clusters(args.n, args.ks, cfg.model.dim).to(device)
    b, s = args.batch_size, args.image_size
    im_q, im_k = torch.randn(b, 3, s, s, device=device), torch.randn(b, 3, s, s, device=device)
    index = torch.randint(args.n, (b,))  # on the host, as the trainer keeps it
    gen = torch.Generator(device=device).manual_seed(0)
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "bf16"
        else contextlib.nullcontext
    )

    def step() -> None:
        model.momentum_update(0.999)
        with autocast():
            q, _ = model(im_q)
            k = model.embed(im_k)
            out = PCLLoss(0.2, args.r)(q, k, model.queue, index, clusters, generator=gen)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.enqueue(k.float())

    return "bare", timed(step, device, args.warmup, args.iters)


def run_pcl_scale(args: argparse.Namespace, cfg: Config) -> tuple[str, float]:
    accelerator = make_accelerator(cfg)
    try:
        return distributed_kind(accelerator), _time_trainer_step(args, cfg, accelerator)
    finally:
        shutdown(accelerator)  # the engine is released when the timing function has returned


def _time_trainer_step(args: argparse.Namespace, cfg: Config, accelerator: Any) -> float:
    from pcl_scale.data import device_input
    from pcl_scale.engine.loop import build_model
    from pcl_scale.engine.mstep import EpochContext, train_step
    from pcl_scale.engine.runtime import unwrap

    comm = Comm()
    local_batch = args.batch_size // comm.world_size
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-4, momentum=0.9)
    set_deepspeed_batch(accelerator, local_batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = unwrap(accelerator, model)
    device = accelerator.device
    clusters = random_clusters(args.n, args.ks, cfg.model.dim).to(device)
    layout = Layout(distributed_kind(accelerator), comm.world_size)
    logger: Any = None  # train_step logs nothing
    ctx = EpochContext(
        cfg, accelerator, model, optimizer, clusters, comm, logger, TrainState(), 0, 1, layout,
        device_input(cfg.data, device),
    )  # fmt: skip
    s = args.image_size
    im_q = torch.randn(local_batch, 3, s, s, device=device)
    im_k = torch.randn(local_batch, 3, s, s, device=device)
    index = torch.randint(args.n, (local_batch,))  # on the host, as the trainer keeps it

    def step() -> None:
        inner.momentum_update(0.999)
        train_step(ctx, im_q, im_k, index, micro=0)
        ctx.state.global_step += 1

    return timed(step, device, args.warmup, args.iters)


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bare = next((r for r in rows if r["engine"] == "bare"), None)
    first = rows[0]
    print(
        f"{first['backbone']}, {first['image_size']} px, batch {first['batch_size']}, "
        f"{first['precision']}, {first['device_name']}\n"
    )
    print("| engine | img/s | vs bare loop | peak GPU memory (GiB) |")
    print("|---|---|---|---|")
    names = {
        "ddp": "Accelerate (DDP with >1 GPU)",
        "zero2": "DeepSpeed ZeRO-2",
        "zero3": "DeepSpeed ZeRO-3",
    }
    for r in rows:
        r["engine"] = names.get(r["engine"], r["engine"])
        ratio = f"{r['img_s'] / bare['img_s']:.3f}" if bare else "-"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['engine']} | {r['img_s']:.1f} | {ratio} | {mem} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["bare", "pcl-scale"], default="pcl-scale")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--ks", type=int, nargs="+", default=[25000, 50000, 100000])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--r", type=int, default=16000)
    parser.add_argument("--queue", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    cfg = bench_config(args)
    name, seconds = (run_bare if args.engine == "bare" else run_pcl_scale)(args, cfg)
    cuda = args.device == "cuda"
    row = {
        "engine": name,
        "img_s": args.batch_size / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    }
    print(json.dumps(row), flush=True)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
