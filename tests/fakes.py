"""A fake communicator: W ranks as threads of one process, for unit tests of world > 1 logic.

Each collective is an exchange through shared slots between two barriers, so the ranks' code runs
as it would under a process group (same call order, same results in rank order) in milliseconds.
Real multi-process behaviour (gloo, launchers, DeepSpeed) stays in the 2-process tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pcl_scale.distributed.comm import Comm

TIMEOUT_S = 30.0  # a rank that never reaches a collective fails the test instead of hanging it


class ThreadGroup:
    """The shared state of W fake ranks: one slot per rank and a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a collective: every rank must call it)."""
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out


class FakeComm(Comm):
    """:class:`Comm` for rank ``rank`` of ``world_size``, without a process group."""

    def __init__(
        self, rank: int, world_size: int, group: ThreadGroup | None = None, cpus: int = 1
    ) -> None:
        self.enabled = True
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self.group = group
        self.cpus = cpus

    def usable_cpus(self) -> int:
        return self.cpus

    def _exchange(self, value: Any) -> list[Any]:
        assert self.group is not None, "this FakeComm has no group: it cannot run collectives"
        return self.group.exchange(self.rank, value)

    def barrier(self) -> None:
        self._exchange(None)

    def all_gather_object(self, obj: object) -> list[object]:
        return self._exchange(obj)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return self._exchange(obj)[src]

    def all_gather_cat(self, t: Tensor) -> Tensor:
        return torch.cat([part.to(t.device) for part in self._exchange(t.detach().clone())])

    def all_to_all(self, t: Tensor) -> Tensor:
        parts = self._exchange(t.detach().clone())  # every rank's whole tensor
        return torch.cat([part.chunk(self.world_size)[self.rank] for part in parts])

    def all_to_all_uneven(
        self, t: Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> Tensor:
        parts = self._exchange((t.detach().clone(), send_counts))
        mine = [part.split(counts)[self.rank] for part, counts in parts]
        assert [len(m) for m in mine] == recv_counts, "send and receive counts disagree"
        return torch.cat(mine)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        parts = self._exchange(t.detach().clone())
        total = parts[0].clone()
        for part in parts[1:]:  # in rank order, as a deterministic reduction would
            total += part
        t.copy_(total)
        return t

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        t.copy_(self._exchange(t.detach().clone())[src])
        return t

    def gather_to_main(self, t: Tensor) -> list[Tensor] | None:
        parts = self._exchange(t.detach().clone())
        return parts if self.is_main else None


def run_ranks(world_size: int, fn: Callable[[FakeComm], Any]) -> list[Any]:
    """``fn(comm)`` on every rank, each in its own thread; the results in rank order."""
    group = ThreadGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fn(FakeComm(rank, world_size, group))
        except BaseException as err:
            errors.append(err)
            group.barrier.abort()  # release the ranks waiting for this one

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
