"""What a run records: ``metrics.jsonl`` and trackers, and the device-side loss meter."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcl_scale.config import Config, to_dict
from pcl_scale.core.loss import LossOutput
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.checkpoint import find_latest
from pcl_scale.errors import DivergedError


class JsonlLogger:
    """Records to ``metrics.jsonl`` in the run directory (main process) and to trackers.

    Each line also carries ``elapsed_s``, seconds since this process started logging (a resumed
    run starts again from 0).
    """

    def __init__(self, path: Path, accelerator: Any, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = path, accelerator, enabled
        self.records: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def log(self, record: dict[str, Any], step: int) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        elapsed = round(time.perf_counter() - self.start, 4)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({**record, "elapsed_s": elapsed}) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, int | float)}
        self.accelerator.log(numeric, step=step)


class Meter:
    """Sums of the logged terms over a logging interval, kept on the device (no per-step sync).

    It also remembers the first step whose loss was not finite; :meth:`summary` (and
    :meth:`raise_if_diverged`) stop the run there, before anything else is saved.
    """

    KEYS = ("loss", "loss_inst", "loss_proto", "acc_inst", "acc_proto")

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.first_bad = torch.full((1,), -1, dtype=torch.long, device=device)

    def add(self, out: LossOutput, step: int) -> None:
        self.count += 1
        for key in self.KEYS:
            value = getattr(out, key)
            if value is not None:
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        bad = ~torch.isfinite(out.loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def raise_if_diverged(self, comm: Comm, run_dir: Path) -> None:
        steps = [int(s) for s in comm.all_gather_cat(self.first_bad.cpu()) if s >= 0]
        if steps:
            last = find_latest(run_dir)
            raise DivergedError(
                f"the loss became NaN or Inf at step {min(steps)}: training stopped without "
                f"saving. Last good checkpoint: {last or 'none'}. Resume from it "
                f"(run.resume=auto) with a lower optim.lr, or in fp32 (run.mixed_precision='no', "
                f"with no mixed_precision in the accelerate config)."
            )

    def summary(self, accelerator: Any, comm: Comm, run_dir: Path) -> dict[str, Any]:
        """The interval's mean of every term over steps and ranks (raises if it diverged)."""
        self.raise_if_diverged(comm, run_dir)
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        mean = (
            accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
        )
        return {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}


@contextlib.contextmanager
def phase(logger: JsonlLogger, comm: Comm, name: str, step: int) -> Iterator[None]:
    """Time a phase that every rank runs, and log how long rank 0 worked alone in it.

    "Alone" is the time rank 0 still worked after every other rank had finished: their shortest
    wait in the barrier that closes the phase (0 on one process). A phase whose rank-0 work grows
    with N shows it here long before a collective times out.
    """
    start = time.perf_counter()
    yield
    done = time.perf_counter()
    comm.barrier()
    waits = comm.all_gather_cat(torch.tensor([time.perf_counter() - done], dtype=torch.float64))
    alone = float(waits[1:].min()) if comm.world_size > 1 else 0.0
    record = {"event": "phase", "phase": name, "seconds": done - start, "rank0_alone_s": alone}
    logger.log(record, step=step)


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` with scalars kept and the rest as strings, for trackers."""
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = (
                value if isinstance(value, int | float | str | bool) else str(value)
            )
    return out
