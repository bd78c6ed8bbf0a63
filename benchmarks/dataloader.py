"""Input pipeline: where a sample's CPU time goes, and samples/s per DataLoader worker.

    python benchmarks/dataloader.py [--n 192] [--image-size 224] [--json OUT]

A synthetic Hugging Face dataset of JPEG bytes at ImageNet's typical 500 x 375 (smooth colour
fields plus noise, about 100 KB each) is written to a temporary directory and read back through
pcl-scale's loader. Side by side in one run, each with one worker process:

* ``float32 (before)``: the PIL pipeline ending in ToTensor + Normalize in the worker (float32
  views; what the trainer shipped before the uint8 pipeline);
* ``uint8``: the same augmentations, uint8 views (the default, ``data.photometric=workers``);
* ``uint8, photometric on device``: workers decode, crop and flip only
  (``data.photometric=device``);

for two-view training samples and for the E-step view, with the bytes per sample that cross from
worker to trainer and the workers per GPU it takes to feed ``--target`` two-view samples/s. The
profile times each stage of ``aug_plus`` alone on a single thread and weights it by its
probability.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pcl_scale.config import DataConfig
from pcl_scale.data import IndexedImages, eval_transform, train_transform


def jpeg_dataset(n: int, root: Path) -> Any:
    """``n`` 500 x 375 JPEGs (quality 90) as an HF dataset saved to and loaded from disk."""
    import datasets

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(n):
        low = rng.integers(0, 255, (24, 32, 3)).astype(np.uint8)
        smooth = np.asarray(
            Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC), np.float64
        )
        pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        blobs.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": blobs}, features=features).save_to_disk(str(root))
    return datasets.load_from_disk(str(root))


def float_pipeline(cfg: DataConfig) -> Any:
    """The worker-side float32 pipeline: the uint8 one with ToTensor + Normalize at its end."""
    view: Any = train_transform(cfg).transform  # a Compose
    tail = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose([*view.transforms[:-1], *tail])


class Pair:
    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[Any, Any]:
        return self.transform(image), self.transform(image)


def per_worker_rate(
    view: IndexedImages, keys: list[Any], batch: int, prefetch: int, workers: int = 1
) -> float:
    """Samples/s of ``workers`` worker processes (per worker when 1), after their first batch
    each (worker start excluded); pinned batches when CUDA is present, as the trainer's."""
    loader = DataLoader(
        view, batch_size=batch, sampler=keys, num_workers=workers, prefetch_factor=prefetch,
        pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    it = iter(loader)
    for _ in range(workers):
        next(it)
    t0, count = time.perf_counter(), 0
    for _, index in it:
        count += len(index)
    return count / (time.perf_counter() - t0)


def sample_bytes(view: IndexedImages, key: Any) -> int:
    out, _ = view[key]
    parts = out if isinstance(out, tuple) else (out,)
    return int(sum(p.numel() * p.element_size() for p in parts))


def profile(ds: Any, cfg: DataConfig, n: int) -> dict[str, float]:
    """Milliseconds per two-view sample of each ``aug_plus`` stage, weighted by its probability."""
    torch.set_num_threads(1)

    def ms(fn: Any, xs: list[Any]) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        out = [fn(x) for x in xs]
        return (time.perf_counter() - t0) / len(xs) * 1e3, out

    # datasets decodes the JPEG when the row is read (Image.load): time the read and the RGB view
    decode, rgb = ms(lambda i: ds[i]["image"].convert("RGB"), list(range(n)))
    crop, crops = ms(T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0)), rgb)
    jitter, _ = ms(T.ColorJitter(0.4, 0.4, 0.4, 0.1), crops)
    gray, _ = ms(T.Grayscale(3), crops)
    blur, _ = ms(lambda im: im.filter(ImageFilter.GaussianBlur(radius=1.05)), crops)
    flip, _ = ms(T.RandomHorizontalFlip(1.0), crops)
    to_float, _ = ms(T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]), crops)
    to_uint8, _ = ms(T.PILToTensor(), crops)
    return {  # per two-view sample: one decode, each view's stages twice
        "decode": decode,
        "crop_resize": 2 * crop,
        "colour_jitter": 2 * 0.8 * jitter,
        "grayscale": 2 * 0.2 * gray,
        "blur": 2 * 0.5 * blur,
        "flip": 2 * 0.5 * flip,
        "to_tensor_normalize_float32": 2 * to_float,
        "to_tensor_uint8": 2 * to_uint8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=192, help="images in the synthetic dataset")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefetch", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--target", type=float, default=1550.0, help="two-view samples/s per GPU")
    parser.add_argument(
        "--workers", type=int, default=0, help="also the rate of this many workers together"
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = jpeg_dataset(args.n, Path(tmp) / "jpegs")
        cfg = DataConfig(image_size=args.image_size, aug="aug_plus")
        device_cfg = DataConfig(image_size=args.image_size, aug="aug_plus", photometric="device")
        seeds = (0, 1)
        keys = [(0, i) for i in range(args.n)]
        train_views = {
            "float32 (before)": IndexedImages(ds, "image", Pair(float_pipeline(cfg)), seeds),
            "uint8": IndexedImages(ds, "image", train_transform(cfg), seeds),
            "uint8, photometric on device": IndexedImages(
                ds, "image", train_transform(device_cfg), seeds
            ),
        }
        estep_views = {
            "float32 (before)": IndexedImages(ds, "image", eval_transform(cfg, as_uint8=False)),
            "uint8": IndexedImages(ds, "image", eval_transform(cfg)),
        }
        report: dict[str, Any] = {"profile_ms": profile(ds, cfg, min(args.n, 64)), "train": {}}
        for name, view in train_views.items():
            rate = per_worker_rate(view, keys, args.batch, 4)
            report["train"][name] = {
                "samples_per_s_per_worker": rate,
                "bytes_per_sample": sample_bytes(view, keys[0]),
                "workers_for_target": args.target / rate,
            }
        report["estep"] = {
            name: {
                "samples_per_s_per_worker": per_worker_rate(
                    view, list(range(args.n)), args.batch, 4
                ),
                "bytes_per_sample": sample_bytes(view, 0),
            }
            for name, view in estep_views.items()
        }
        if args.workers:
            many = keys * max(1, 8 * args.workers * args.batch // len(keys))  # several rounds
            report["workers"] = {
                name: per_worker_rate(view, many, args.batch, 4, args.workers)
                for name, view in train_views.items()
            }
        report["prefetch"] = {
            str(p): per_worker_rate(train_views["uint8"], keys, args.batch, p)
            for p in args.prefetch
        }
    print_report(report, args.target)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def print_report(report: dict[str, Any], target: float) -> None:
    total = sum(v for k, v in report["profile_ms"].items() if k != "to_tensor_uint8")
    print("CPU time per two-view sample (aug_plus, float32 pipeline), single thread:")
    for stage, ms in report["profile_ms"].items():
        print(f"  {stage:30s} {ms:6.2f} ms  ({100 * ms / total:4.1f}%)")
    base = report["train"]["float32 (before)"]
    print(f"\ntwo-view training samples (target {target:.0f}/s per GPU):")
    for name, row in report["train"].items():
        print(
            f"  {name:30s} {row['samples_per_s_per_worker']:6.1f} /s per worker "
            f"(x{row['samples_per_s_per_worker'] / base['samples_per_s_per_worker']:.2f}), "
            f"{row['bytes_per_sample']:7d} B/sample "
            f"(x{row['bytes_per_sample'] / base['bytes_per_sample']:.2f}), "
            f"{row['workers_for_target']:5.1f} workers per GPU"
        )
    base_e = report["estep"]["float32 (before)"]
    print("\nE-step view:")
    for name, row in report["estep"].items():
        print(
            f"  {name:30s} {row['samples_per_s_per_worker']:6.1f} /s per worker "
            f"(x{row['samples_per_s_per_worker'] / base_e['samples_per_s_per_worker']:.2f}), "
            f"{row['bytes_per_sample']:7d} B/sample"
        )
    for name, rate in report.get("workers", {}).items():
        print(f"  {name:30s} {rate:7.1f} two-view samples/s with all the workers together")
    print("\nprefetch_factor, uint8 pipeline, one worker:")
    for depth, rate in report["prefetch"].items():
        print(f"  {depth:>3s}: {rate:6.1f} /s")


if __name__ == "__main__":
    main()
