"""Time per iteration: supervised step (a), MoCo v2 step (b, InfoNCE) and PCL step (c, ProtoNCE).

CPU configuration (ResNet-18 with the small-image stem, 32 px, batch 64):

    python benchmarks/train_step.py

GPU configuration (ResNet-50, 224 px):

    python benchmarks/train_step.py --device cuda --backbone resnet50 --image-size 224 \
        --batch-size 128

The three steps are timed interleaved (a, b, c, a, b, c, ...) so that drift of the machine hits
all alike, in fp32 and under bf16 autocast; the table gives the median time per iteration and the
ratios c/b (the cost of prototypes over MoCo) and b/a (MoCo over supervised learning). Each step
is timed two ways: alone, waiting for the device before and after it ("synced": its latency, host
work included), and as ``--block`` consecutive steps with one wait at the end ("back to back":
the time per step of a training loop, which does not wait for the GPU between steps, so the host
issues the next operations while the device runs the last ones). On a CPU, where each operation
ends before the next is issued, the two differ only by noise.

A second table times the loss alone (forward and backward, from given queries and keys) with and
without the prototype term, and counts the ATen operations each step dispatches: on a GPU every
one is a kernel launch the host must issue, which is what a small term costs next to a fast step.

(b) and (c) are the trainer's step on one process: momentum update, query forward, key forward,
loss (:class:`pcl_scale.core.loss.PCLLoss`), backward, SGD step, enqueue. (c) adds ProtoNCE over
M = 3 granularities (K = 25k/50k/100k over N = 1.28M dataset indices, r = 16,000 negative
prototypes each, as for ImageNet); (b) passes no clusters. (a) is the backbone with a linear
classifier under cross-entropy on the query view.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pcl_scale.core.clusters import ClusterResult, random_clusters
from pcl_scale.core.loss import PCLLoss
from pcl_scale.core.model import BackboneSpec, PCLModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    spec = BackboneSpec(args.backbone, args.small_stem, args.image_size)
    model = PCLModel(spec, 128, "mlp", args.queue).to(device)
    classifier = nn.Linear(model.num_features, 1000).to(device)
    sup_params = list(model.encoder_q.backbone.parameters()) + list(classifier.parameters())
    sup_opt = torch.optim.SGD(sup_params, lr=1e-4, momentum=0.9)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-4, momentum=0.9)
    b, s = args.batch_size, args.image_size
    im_q = torch.randn(b, 3, s, s, device=device)
    im_k = torch.randn(b, 3, s, s, device=device)
    labels = torch.randint(1000, (b,), device=device)
    index = torch.randint(args.n, (b,))  # on the host, as the trainer keeps it
    clusters = random_clusters(args.n, args.ks, 128).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def supervised() -> None:
        loss = F.cross_entropy(classifier(model.encoder_q.backbone(im_q)), labels)
        loss.backward()
        sup_opt.step()
        sup_opt.zero_grad(set_to_none=True)

    def contrastive(with_prototypes: bool) -> Callable[[], None]:
        def step() -> None:
            model.momentum_update(0.999)
            q, _ = model(im_q)
            k = model.embed(im_k)
            out = PCLLoss(0.2, args.r)(
                q, k, model.queue, index, clusters if with_prototypes else None, generator=gen
            )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.enqueue(k.float())

        return step

    return {"a": supervised, "b": contrastive(False), "c": contrastive(True)}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active (forward, backward and optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def autocast_for(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


Timings = dict[tuple[str, int], float]


def timed(
    steps: dict[str, Callable[[], None]],
    args: argparse.Namespace,
    device: torch.device,
    autocast: Callable[[], Any],
    blocks: tuple[int, ...] = (1,),
) -> tuple[Timings, dict[str, int]]:
    """Median seconds per call of each step, interleaved, and the ops one call dispatches.

    Keyed by (step, block): each rep runs every step ``block`` times in a row between two waits
    for the device, for each block size, and records the time divided by ``block``.
    """
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in steps for b in blocks}
    for rep in range(args.warmup + args.iters):
        for name, step in steps.items():
            for block in blocks:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(block):
                    with autocast():
                        step()
                sync(device)
                if rep >= args.warmup:
                    times[name, block].append((time.perf_counter() - t0) / block)
    ops = {}
    for name, step in steps.items():
        with OpCounter() as counter, autocast():
            step()
        ops[name] = counter.count
    return {key: statistics.median(t) for key, t in times.items()}, ops


def measure(args: argparse.Namespace, precision: str) -> tuple[Timings, dict[str, int]]:
    device = torch.device(args.device)
    blocks = (1, args.block) if args.block > 1 else (1,)
    return timed(make_steps(args, device), args, device, autocast_for(device, precision), blocks)


def loss_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """The loss alone, forward and backward to the queries: InfoNCE only and PCL."""
    torch.manual_seed(1)
    b = args.batch_size
    q0 = F.normalize(torch.randn(b, 128, device=device), dim=1)
    k = F.normalize(torch.randn(b, 128, device=device), dim=1)
    queue = F.normalize(torch.randn(args.queue, 128, device=device), dim=1)
    index = torch.randint(args.n, (b,))  # on the host, as the trainer keeps it
    clusters = random_clusters(args.n, args.ks, 128).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def loss(prototypes: ClusterResult | None) -> Callable[[], None]:
        def step() -> None:
            q = q0.clone().requires_grad_()
            out = PCLLoss(0.2, args.r)(q, k, queue, index, prototypes, generator=gen)
            out.loss.backward()

        return step

    return {"infonce": loss(None), "pcl": loss(clusters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue", type=int, default=16384, help="instance queue length")
    parser.add_argument("--r", type=int, default=16000, help="negative prototypes")
    parser.add_argument("--n", type=int, default=1_281_167, help="dataset size (assignments)")
    parser.add_argument("--ks", type=int, nargs="+", default=[25000, 50000, 100000])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument(
        "--block", type=int, default=5, help="consecutive steps per back-to-back timing"
    )
    args = parser.parse_args()
    if args.small_stem is None:
        args.small_stem = args.image_size <= 64
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(
        f"{args.backbone} (small stem: {args.small_stem}), {args.image_size} px, batch "
        f"{args.batch_size}, {args.device} ({torch.get_num_threads()} threads), queue "
        f"{args.queue}, ProtoNCE K = {args.ks} with r = {args.r}; median of {args.iters} "
        f"interleaved iterations after {args.warmup} warm-up\n"
    )
    print(
        "| precision | timing | (a) supervised s/it | (b) MoCo v2 s/it | (c) PCL s/it | c/b | b/a "
        "| ops (a) / (b) / (c) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        t, ops = measure(args, precision)
        for block in sorted({b for _, b in t}):
            how = "synced" if block == 1 else f"{block} back to back"
            a, b, c = (t[name, block] for name in "abc")
            print(
                f"| {precision} | {how} | {a:.4f} | {b:.4f} | {c:.4f} | {c / b:.3f} | "
                f"{b / a:.3f} | {ops['a']} / {ops['b']} / {ops['c']} |",
                flush=True,
            )
    print("\nLoss alone (forward + backward to q):\n")
    print("| precision | InfoNCE ms | PCL ms | prototype term ms | ops InfoNCE / PCL |")
    print("|---|---|---|---|---|")
    device = torch.device(args.device)
    for precision in args.precisions:
        t, ops = timed(loss_steps(args, device), args, device, autocast_for(device, precision))
        infonce, pcl = t["infonce", 1], t["pcl", 1]
        print(
            f"| {precision} | {1e3 * infonce:.3f} | {1e3 * pcl:.3f} | "
            f"{1e3 * (pcl - infonce):.3f} | {ops['infonce']} / {ops['pcl']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
