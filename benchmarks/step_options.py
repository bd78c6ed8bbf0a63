"""The trainer's PCL step with and without ``run.channels_last`` and ``run.compile``, next to a
tuned supervised step, in one run.

CPU (ResNet-18, small stem, 32 px, batch 64, fp32):

    python benchmarks/step_options.py

GPU (ResNet-50, 224 px, batch 128, bf16):

    python benchmarks/step_options.py --device cuda --backbone resnet50 --image-size 224 \
        --batch-size 128 --precision bf16

Each variant is :func:`pcl_scale.engine.mstep.train_step` on a model built and sped up as the
trainer does (:func:`pcl_scale.engine.runtime.speed_up`), fed uint8 batches from (pinned) host
memory, so the device-side cast and normalisation are timed too (and, in the last variant, the
photometric augmentations of ``data.photometric=device``). ``supervised`` is the backbone
with a linear classifier under cross-entropy, channels-last and compiled when the PCL variant
that is is, the same precision: the ratio PCL/supervised is expected near 4/3 (one
forward-backward plus one key forward). Variants are timed in alternating blocks after their
warm-up (compilation included there), and the median block is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcl_scale.artifacts import TrainState
from pcl_scale.config import Config, load_config
from pcl_scale.core.clusters import random_clusters
from pcl_scale.core.model import BackboneSpec, build_backbone
from pcl_scale.data import device_input
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.checkpoint import Layout
from pcl_scale.engine.loop import build_model
from pcl_scale.engine.mstep import EpochContext, train_step
from pcl_scale.engine.runtime import make_accelerator, speed_up, unwrap, uses_channels_last

VARIANTS = {  # run.channels_last, run.compile, data.photometric
    "default": ("false", False, "workers"),
    "channels_last": ("true", False, "workers"),
    "compile": ("false", True, "workers"),
    "channels_last + compile": ("true", True, "workers"),
    "channels_last + photometric on device": ("true", False, "device"),
}


def config(
    args: argparse.Namespace, channels_last: str, compile_: bool, photometric: str = "workers"
) -> Config:
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
            f"run.channels_last={channels_last}",
            f"run.compile={str(compile_).lower()}",
            "data.aug=aug_plus",
            f"data.photometric={photometric}",
        ],
    )


def host_batch(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    s = args.image_size
    x = torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8)
    return x.pin_memory() if device.type == "cuda" else x


def pcl_step(args: argparse.Namespace, accelerator: Any, variant: str) -> Callable[[], None]:
    cfg = config(args, *VARIANTS[variant])
    model = build_model(cfg)
    speed_up(model, cfg, accelerator)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-4, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner, device = unwrap(accelerator, model), accelerator.device
    clusters = random_clusters(args.n, args.ks, cfg.model.dim).to(device)
    to_input = device_input(cfg.data, device, uses_channels_last(cfg, accelerator))
    logger: Any = None  # train_step logs nothing
    ctx = EpochContext(cfg, accelerator, model, optimizer, clusters, Comm(), logger,
                       TrainState(), 0, 1, Layout(), to_input)  # fmt: skip
    im_q, im_k = host_batch(args, device), host_batch(args, device)
    index = torch.randint(args.n, (args.batch_size,))

    def step() -> None:
        inner.momentum_update(0.999)
        train_step(ctx, im_q, im_k, index, micro=0)
        ctx.state.global_step += 1

    return step


def supervised_step(args: argparse.Namespace, accelerator: Any, tuned: bool) -> Callable[[], None]:
    """Backbone + linear classifier, cross-entropy; channels-last and compiled when ``tuned``."""
    cfg = config(args, "true" if tuned else "false", tuned)
    device = accelerator.device
    spec = BackboneSpec(args.backbone, args.image_size <= 64, args.image_size)
    backbone, width = build_backbone(spec)
    net = nn.Sequential(backbone, nn.Linear(width, 1000)).to(device)
    to_input = device_input(cfg.data, device, tuned)
    if tuned:
        net = net.to(memory_format=torch.channels_last)
        net.compile()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    images = host_batch(args, device)
    labels = torch.randint(1000, (args.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(to_input(images)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="no")
    parser.add_argument("--ks", type=int, nargs="+", default=[25000, 50000, 100000])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--r", type=int, default=16000)
    parser.add_argument("--queue", type=int, default=16384)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    accelerator = make_accelerator(config(args, "false", False))
    device = accelerator.device
    steps: dict[str, Callable[[], None]] = {
        v: pcl_step(args, accelerator, v) for v in args.variants
    }
    tuned = any(VARIANTS[v][1] for v in args.variants)
    steps["supervised" + (" (channels_last + compile)" if tuned else "")] = supervised_step(
        args, accelerator, tuned
    )
    warmup_s = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        warmup_s[name] = time.perf_counter() - t0
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.blocks):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.block):
                step()
            sync(device)
            seconds[name].append((time.perf_counter() - t0) / args.block)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    base = median[args.variants[0]]
    supervised = median[list(steps)[-1]]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"{where}, torch {torch.__version__}")  # fmt: skip
    print("| step | ms | img/s | vs default | vs supervised | warm-up s |")
    print("|---|---|---|---|---|---|")
    for name, s in median.items():
        print(f"| {name} | {1e3 * s:.1f} | {args.batch_size / s:.1f} | x{base / s:.3f} "
              f"| {s / supervised:.3f} | {warmup_s[name]:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"median_s": median, "warmup_s": warmup_s}))


if __name__ == "__main__":
    main()
