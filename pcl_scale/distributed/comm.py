"""The one module that calls ``torch.distributed``: thin collectives that are no-ops on one process.

Tensors may live anywhere: they travel through the device the backend needs (CUDA for NCCL, CPU
for gloo) and come back on the caller's device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pcl_scale.core.kmeans import faiss_available


def init_from_env(timeout_min: float = 60.0) -> torch.device:
    """Join the process group a launcher describes (WORLD_SIZE > 1), once; this rank's device.

    NCCL on GPUs, gloo on CPU; a single process stays without a group. A collective fails after
    ``timeout_min`` minutes of waiting.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


class Comm:
    """Collectives over the default process group; every method works on a single process too."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        nccl = self.enabled and dist.get_backend() == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def idle_host_threads(self) -> Iterator[int]:
        """Let this rank use the CPU threads of the ranks that wait for it on the same host.

        For work that one rank does while the others block in a collective (gather-mode
        clustering, the evaluation's scoring on rank 0): a blocked gloo or NCCL rank uses no CPU,
        so its threads would idle. The host's ranks are ``LOCAL_WORLD_SIZE`` (set by torchrun and
        ``accelerate launch``), each assumed to run as many threads as this one, capped by the
        CPUs this process may use. Sets torch's intra-op threads and faiss' OpenMP threads for
        the block, restores both after; yields the thread count in use.
        """
        before = torch.get_num_threads()
        local = _local_world_size() if self.world_size > 1 else 1
        threads = min(before * local, self.usable_cpus())
        if threads <= before:
            yield before
            return
        faiss = sys.modules.get("faiss") if faiss_available() else None
        faiss_before = faiss.omp_get_max_threads() if faiss is not None else 0
        torch.set_num_threads(threads)
        if faiss is not None:
            faiss.omp_set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)
            if faiss is not None:
                faiss.omp_set_num_threads(faiss_before)

    def usable_cpus(self) -> int:
        """The CPUs this process may run on (its affinity mask where the OS has one)."""
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """``src``'s picklable ``obj`` on every rank (a decision made once, followed by all)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate equally shaped tensors of all ranks along dim 0 (rank order)."""
        if not self.enabled:
            return t
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src)
        return torch.cat(out).to(t.device)

    def all_to_all(self, t: Tensor) -> Tensor:
        """Part r of ``t`` (dim 0 split into world-size equal parts) to rank r; parts received
        from every rank, in rank order, as one tensor of ``t``'s shape."""
        if not self.enabled:
            return t
        src = t.to(self.device).contiguous()
        out = torch.empty_like(src)
        dist.all_to_all_single(out, src)
        return out.to(t.device)

    def all_to_all_uneven(
        self, t: Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> Tensor:
        """Rows ``t[sum(send_counts[:r]) : sum(send_counts[:r + 1])]`` to rank r; the rows received
        from every rank (``recv_counts[s]`` from rank s), in rank order, as one tensor."""
        if not self.enabled:
            return t
        src = t.to(self.device).contiguous()
        out = src.new_empty((sum(recv_counts), *src.shape[1:]))
        dist.all_to_all_single(
            out, src, output_split_sizes=recv_counts, input_split_sizes=send_counts
        )
        return out.to(t.device)

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` of any rank (collective), e.g. a padded width."""
        return int(self.all_gather_cat(torch.tensor([value])).max())

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place; returns ``t``."""
        if self.enabled:
            buf = t.to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``t`` on every rank with ``src``'s ``t``, in place; returns ``t``."""
        if self.enabled:
            buf = t.to(self.device).contiguous()
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast_buffers(self, module: torch.nn.Module, src: int = 0) -> None:
        """Rank ``src``'s buffers (BatchNorm statistics, ...) everywhere: one broadcast per dtype.

        DDP does it only at the start of each forward and DeepSpeed never does, so whatever reads
        running statistics on every rank (the E-step, evaluation, export) calls this first.
        """
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = self.broadcast(torch.cat([b.detach().reshape(-1) for b in group]), src)
            for b, part in zip(group, flat.split([b.numel() for b in group]), strict=True):
                b.copy_(part.view_as(b))

    def gather_to_main(self, t: Tensor) -> list[Tensor] | None:
        """Equally shaped tensors of all ranks on rank 0, on ``t``'s device (None elsewhere)."""
        if not self.enabled:
            return [t]
        src = t.to(self.device).contiguous()
        buckets = [torch.empty_like(src) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(src, gather_list=buckets, dst=0)
        return [b.to(t.device) for b in buckets] if buckets is not None else None


def _local_world_size() -> int:
    """``LOCAL_WORLD_SIZE`` as the launcher set it; 1 (borrow nothing) if absent or not a count."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(int(value), 1) if value.strip().isdigit() else 1
