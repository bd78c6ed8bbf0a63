"""Whole-epoch cost model: seconds, rank-0-alone seconds, traffic and memory per rank, per phase.

    python benchmarks/epoch_cost_model.py

One epoch of the default recipe (ResNet-50 at 224 px, D = 128, K = 25k + 50k + 100k, 20 Lloyd
iterations x 5 restarts, ``estep.mode=auto`` = sharded on CUDA, a kNN check, a checkpoint) and the
end-of-run evaluation, at 1.28M images on 8 and 128 GPUs and at 100M images on 128 GPUs. The
counts follow the implementation; the rates are listed in ``RATES`` with where each comes from:
``measured`` (docs/benchmarks.md, with the command) or ``assumed`` (no cluster to measure on).
"""

from __future__ import annotations

from dataclasses import dataclass

GB, MB = 1e9, 1e6


@dataclass(frozen=True)
class Rate:
    value: float
    source: str


RATES = {
    "train_img_s": Rate(1552.8, "measured: PCL step, ResNet-50 224 px bf16 batch 128, one H200"),
    "kmeans_flop_s": Rate(1.15e15 / 4.07, "measured: 1.15e15 FLOP of clustering in 4.07 s, H200"),
    "infer_img_s": Rate(3 * 1552.8, "assumed: 3x the training rate (a forward, no backward)"),
    "knn_flop_s": Rate(5e13, "assumed: fp32 matmul on one H200, well under its TF32 peak"),
    "nvlink_b_s": Rate(400 * GB, "assumed: all-reduce bus bandwidth within an NVLink node"),
    "network_b_s": Rate(50 * GB, "assumed: 400 Gb/s InfiniBand per GPU across nodes"),
    "disk_b_s": Rate(2 * GB, "assumed: writes to a shared filesystem per node"),
}

D, F = 128, 2048  # embedding (clustered) and backbone feature widths
KS = (25_000, 50_000, 100_000)
NITER, NREDO = 20, 5
PARAMS = 25.6e6  # ResNet-50 (+ head); the momentum encoder and SGD momentum triple it
BATCH = 128  # per GPU
IMAGE_BYTES = 3 * 224 * 224  # a uint8 view, as the loaders send it (float32 before: x4)
QUERIES, KNN_K = 50_000, 200
EVAL_NITER, EVAL_NREDO, CLASSES = 100, 10, 1000
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Phase:
    """One phase on every rank: seconds, rank 0's seconds alone, bytes moved and held per rank."""

    seconds: float
    alone: float = 0.0
    traffic: float = 0.0
    memory: float = 0.0


@dataclass(frozen=True)
class Scale:
    n: int
    w: int

    @property
    def local(self) -> float:
        return self.n / self.w

    @property
    def steps(self) -> float:
        return self.local / BATCH

    @property
    def bandwidth(self) -> float:
        return rate("nvlink_b_s") if self.w <= GPUS_PER_NODE else rate("network_b_s")

    def ring(self, nbytes: float) -> float:
        """Bytes a rank sends (and receives) in a ring all-reduce of ``nbytes``."""
        return 2 * nbytes * (self.w - 1) / self.w

    @property
    def assignments(self) -> float:
        return len(KS) * self.n * 4  # int32, every process, host memory


def rate(name: str) -> float:
    return RATES[name].value


def extraction(s: Scale, rows: float, width: int) -> Phase:
    return Phase(rows / rate("infer_img_s"), memory=rows * width * 4)


def clustering(s: Scale) -> Phase:
    """Sharded k-means: local assignments, per-iteration all-reduce of the float64 sums."""
    iterations = NITER * NREDO
    flop = sum(2 * s.n * k * D for k in KS) * (iterations + NREDO)  # + the final assignments
    sums = [k * D * 8 + k * 8 for k in KS]
    traffic = sum(s.ring(b) for b in sums) * iterations + s.assignments * (s.w - 1) / s.w
    seconds = flop / (s.w * rate("kmeans_flop_s")) + traffic / s.bandwidth
    return Phase(seconds, traffic=traffic, memory=s.local * D * 4 + max(sums) + max(KS) * D * 4)


def mstep(s: Scale) -> Phase:
    """DDP steps; the gradient all-reduce overlaps the backward pass (its bytes are listed)."""
    traffic = s.steps * s.ring(PARAMS * 4)
    return Phase(s.local / rate("train_img_s"), traffic=traffic, memory=s.assignments + s.local * 4)


def shuffle_exchange(s: Scale) -> Phase:
    """Shuffled BatchNorm: one all_to_all of the uint8 key images each rank encodes (B per rank
    at most), then the keys gathered once (unshuffle and queue)."""
    images = BATCH * (1 - 1 / s.w) * IMAGE_BYTES
    keys = (s.w - 1) * BATCH * D * 4
    per_step = images + keys
    return Phase(s.steps * per_step / s.bandwidth, traffic=s.steps * per_step,
                 memory=BATCH * IMAGE_BYTES)  # fmt: skip


def shuffle_exchange_before(s: Scale) -> Phase:
    """The exchange before: every rank's float32 key images to every rank, every step."""
    per_step = (s.w - 1) * BATCH * IMAGE_BYTES * 4
    return Phase(s.steps * per_step / s.bandwidth, traffic=s.steps * per_step,
                 memory=s.w * BATCH * IMAGE_BYTES * 4)  # fmt: skip


def knn(s: Scale) -> Phase:
    """Sharded kNN: queries all-gathered, candidates returned; the shard and a normalised copy."""
    scoring = 2 * QUERIES * s.n * F / (s.w * rate("knn_flop_s"))
    seen = extraction(s, s.local + QUERIES / s.w, F)
    return Phase(seen.seconds + scoring, traffic=QUERIES * F * 4 + QUERIES * KNN_K * 12,
                 memory=2 * s.local * F * 4)  # fmt: skip


def checkpoint(s: Scale) -> Phase:
    """Rank 0 writes the model and optimizer (DDP); every rank its 1/W of the assignments."""
    model_state = 3 * PARAMS * 4
    seconds = (model_state + s.assignments / s.w) / rate("disk_b_s")
    return Phase(seconds, alone=model_state / rate("disk_b_s"))


def final_evaluation(s: Scale) -> Phase:
    """kNN and sharded k-means scores (K = classes); rank 0 writes the 10,000-row sample."""
    scan = knn(s)
    flop = 2 * s.n * CLASSES * F * EVAL_NITER * EVAL_NREDO
    traffic = scan.traffic + s.ring(CLASSES * F * 8) * EVAL_NITER * EVAL_NREDO
    seconds = scan.seconds + flop / (s.w * rate("kmeans_flop_s")) + traffic / s.bandwidth
    alone = 10_000 * F * 4 / rate("disk_b_s")
    return Phase(seconds, alone=alone, traffic=traffic, memory=scan.memory + s.n * 4)


def export(s: Scale) -> Phase:
    seconds = PARAMS * 4 / rate("disk_b_s")
    return Phase(seconds, alone=seconds)


def phases(s: Scale) -> dict[str, Phase]:
    """An epoch's phases, then the end-of-run ones."""
    return {
        "E-step extraction": extraction(s, s.local, D),
        "E-step clustering (sharded)": clustering(s),
        "M-step (DDP)": mstep(s),
        "M-step shuffled-BN exchange (all_to_all, uint8)": shuffle_exchange(s),
        "M-step shuffled-BN exchange before (all-gather, float32; not summed)": (
            shuffle_exchange_before(s)
        ),
        "kNN check": knn(s),
        "checkpoint": checkpoint(s),
        "final evaluation (once)": final_evaluation(s),
        "export (once)": export(s),
    }


def fmt_bytes(b: float) -> str:
    return "0" if b == 0 else (f"{b / GB:,.2f} GB" if b >= 0.1 * GB else f"{b / MB:,.1f} MB")


def main() -> None:
    print("Rates:")
    for name, r in RATES.items():
        print(f"- {name} = {r.value:.4g} ({r.source})")
    for label, n, w in (("1.28M", 1_281_167, 8), ("1.28M", 1_281_167, 128), ("100M", 10**8, 128)):
        print(f"\n### N = {label}, W = {w}\n")
        print("| phase | seconds | rank 0 alone (s) | traffic per rank | memory per rank |")
        print("|---|---|---|---|---|")
        rows = phases(Scale(n, w))
        for name, p in rows.items():
            print(f"| {name} | {p.seconds:,.2f} | {p.alone:.3f} | {fmt_bytes(p.traffic)} | "
                  f"{fmt_bytes(p.memory)} |")  # fmt: skip
        epoch = sum(p.seconds for k, p in rows.items() if "once" not in k and "before" not in k)
        estep = sum(p.seconds for k, p in rows.items() if k.startswith("E-step"))
        shares = ", ".join(
            f"every {e}: {estep / e / (epoch - estep + estep / e):.0%}" for e in (1, 2, 4)
        )
        before = rows["M-step shuffled-BN exchange before (all-gather, float32; not summed)"]
        now = rows["M-step shuffled-BN exchange (all_to_all, uint8)"]
        with_before = epoch - now.seconds + before.seconds
        print(f"\nepoch: {epoch:,.1f} s; E-step share of the epoch with estep.every = {shares}; "
              f"with the exchange before: {with_before:,.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
