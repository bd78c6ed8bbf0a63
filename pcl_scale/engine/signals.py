"""SIGTERM/SIGINT as a request to checkpoint at the next step boundary and return."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from pcl_scale.distributed.comm import Comm


class StopRequest:
    """A context that turns SIGTERM/SIGINT into a flag (handlers restored on exit).

    Every rank checks the flags of all ranks at each step boundary, so all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signum

    def agreed(self, comm: Comm) -> bool:
        """True on every rank when any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0])
        return bool(comm.all_reduce_sum(flag)[0] > 0)
