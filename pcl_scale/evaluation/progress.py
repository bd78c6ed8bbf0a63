"""What an evaluation says while it runs: each split it extracts and each protocol as it starts,
with the time each took, on rank 0's stderr; a tqdm bar during extraction when stderr is a
terminal (a log file gets the plain lines only)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pcl_scale.distributed.comm import Comm
from pcl_scale.distributed.extract import ExtractOptions, extract_shard


@dataclass(frozen=True)
class Progress:
    """Progress lines ``[prefix] message`` on stderr, printed only where ``enabled`` (rank 0).

    The stream is looked up when a line is printed (``sys.stderr`` at that moment), so a caller
    that redirects stderr gets the lines too.
    """

    enabled: bool
    prefix: str = "eval"

    @property
    def bars(self) -> bool:
        """Whether extraction shows a tqdm bar: enabled and stderr is a terminal."""
        isatty = getattr(sys.stderr, "isatty", None)
        return self.enabled and callable(isatty) and bool(isatty())

    def line(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.prefix}] {message}", file=sys.stderr, flush=True)

    def extract(
        self, encoder: nn.Module, view: Any, comm: Comm, opts: ExtractOptions, what: str
    ) -> tuple[Tensor, Tensor]:
        """:func:`extract_shard` as a stage named ``what``, with a bar where :attr:`bars`."""
        opts = dataclasses.replace(opts, progress=self.bars, desc=what)
        with self.stage(what):
            return extract_shard(encoder, view, comm, opts)

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[None]:
        """``what ...`` when the stage starts and ``what: done in S s`` when it ends."""
        self.line(f"{what} ...")
        start = time.perf_counter()
        yield
        self.line(f"{what}: done in {time.perf_counter() - start:.1f} s")
