"""Print the E-step cost model of docs/scaling.md: memory per rank and bytes per k-means iteration.

    python benchmarks/estep_cost_model.py > /tmp/tables.md

Counts follow the implementation: features are float32; gather mode gathers them to rank 0,
clusters there and broadcasts prototypes, phi and int64 assignments; sharded mode keeps them
on their rank, all-reduces float64 per-cluster sums (K x D) and counts (K) every iteration, and
all-gathers int32 assignments once per granularity. A ring all-reduce of B bytes sends and
receives about 2 B (W - 1) / W per rank.
"""

from __future__ import annotations

GB = 1e9
D = 128
KS = (25_000, 50_000, 100_000)
NS = {"1.28M": 1_281_167, "14M": 14_197_122, "1B": 1_000_000_000}
WORLDS = (8, 64, 512)
GPU_BYTES = 80 * GB  # one H100; the model, optimizer and activations need part of it


def fmt(b: float) -> str:
    return f"{b / GB:,.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:,.1f} MB"


def gather_mode(n: int, w: int) -> dict[str, float]:
    feats = n * D * 4
    assign = sum(n * 8 for _ in KS)  # int64 per granularity, on every rank
    protos = sum(k * D * 4 + k * 4 for k in KS)
    return {
        "rank 0 memory": feats + assign + protos,
        "other rank memory": feats / w + assign + protos,
        "per-iteration traffic per rank": 0.0,
        "once per E-step, into rank 0": feats * (w - 1) / w,
        "once per E-step, broadcast": assign + protos,
    }


def sharded_mode(n: int, w: int) -> dict[str, float]:
    feats = n * D * 4 / w
    assign = sum(n * 4 for _ in KS)  # int32, all-gathered
    state = max(k * D * 4 + k * D * 8 + k * 8 for k in KS)  # centroids + float64 sums + counts
    per_iter = {k: 2 * (k * D * 8 + k * 8) * (w - 1) / w for k in KS}
    return {
        "memory per rank": feats + assign + state,
        "features per rank": feats,
        "per-iteration traffic per rank": per_iter[KS[-1]],
        "per-iteration traffic, K=25k": per_iter[KS[0]],
        "once per E-step, all-gather": assign * (w - 1) / w,
    }


def main() -> None:
    print(
        "| N | world | gather: rank 0 memory | gather: other ranks | gather: into rank 0 once |"
        " sharded: memory per rank | sharded: traffic per iteration (K=25k / 100k) |"
        " sharded: all-gather once |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n in NS.items():
        for w in WORLDS:
            g, s = gather_mode(n, w), sharded_mode(n, w)
            fits = "" if g["rank 0 memory"] < GPU_BYTES else " (does not fit one GPU)"
            cells = [
                name,
                str(w),
                fmt(g["rank 0 memory"]) + fits,
                fmt(g["other rank memory"]),
                fmt(g["once per E-step, into rank 0"]),
                fmt(s["memory per rank"]),
                f"{fmt(s['per-iteration traffic, K=25k'])} / "
                f"{fmt(s['per-iteration traffic per rank'])}",
                fmt(s["once per E-step, all-gather"]),
            ]
            print("| " + " | ".join(cells) + " |")
    flops = sum(2 * NS["1.28M"] * k * D for k in KS) * 20
    print(f"\nImageNet-1k, 3 granularities x 20 iterations: {flops:.2e} FLOP of distance matmuls.")


if __name__ == "__main__":
    main()
