"""Sharded feature extraction addressed by dataset index, with a coverage check.

Each rank embeds the strided shard ``range(rank, N, world)`` of a deterministic view (no padding,
so no duplicates); rows are assembled by dataset index, and every index must arrive exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pcl_scale.distributed.comm import Comm


@dataclass(frozen=True)
class ExtractOptions:
    """How to run an encoder over a dataset: batch, workers, device, precision, progress."""

    batch_size: int
    num_workers: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    progress: bool = False
    desc: str = "E-step"
    # Asked every ``stop_every`` batches, on every rank at once: True ends the extraction with
    # StopRequestedError (a preemption notice honoured inside the E-step and the evaluation).
    stop: Callable[[], bool] | None = None
    stop_every: int = 16
    # The encoder's forward is itself a collective (ZeRO-3 gathers parameters per layer): every
    # rank then runs the same number of forwards, and autograd's no_grad replaces inference
    # mode, whose tensors ZeRO-3 cannot re-partition.
    collective: bool = False
    # How a loaded batch becomes the encoder's input on ``device`` (the cast and normalisation
    # of uint8 views, DeviceInput); None: moved there as it is.
    to_input: Callable[[Tensor], Tensor] | None = None
    # Further DataLoader settings (pinned memory, persistent workers, prefetch depth).
    loader_options: dict[str, Any] = field(default_factory=dict)
    # Loaders kept across calls by dataset (with their persistent workers): the E-step's view is
    # extracted again every epoch. None: a new loader per call.
    cache: dict[int, tuple[Any, DataLoader]] | None = None

    def input(self, images: Tensor) -> Tensor:
        if self.to_input is not None:
            return self.to_input(images)
        return images.to(self.device, non_blocking=True)

    def loader(self, dataset: Any, rank: int, world_size: int) -> DataLoader:
        """The DataLoader over the strided shard of ``dataset``: the cached one when it was seen
        before (same rank and world), else a new one (cached when ``cache`` is set)."""
        key = id(dataset)
        if self.cache is not None and key in self.cache:
            return self.cache[key][1]
        shard = Subset(dataset, range(rank, len(dataset), world_size))
        options = dict(self.loader_options)
        if self.cache is None:  # a loader used once: its workers end with its iteration
            options.pop("persistent_workers", None)
        loader = DataLoader(
            shard, batch_size=self.batch_size, num_workers=self.num_workers, **options
        )
        if self.cache is not None:
            self.cache[key] = (dataset, loader)  # the dataset kept alive: its id stays its own
        return loader


class StopRequestedError(Exception):
    """A stop was agreed by every rank during an extraction; nothing of it is kept."""


def extract_shard(
    embed: Callable[[Tensor], Tensor], dataset: Any, comm: Comm, opts: ExtractOptions
) -> tuple[Tensor, Tensor]:
    """Embed this rank's strided shard.

    Args:
        embed: maps a (B, 3, H, W) batch to (B, D) features (e.g. the momentum encoder).
        dataset: yields ``(image tensor, dataset index)``.

    Returns:
        indices (n_local,) int64 and features (n_local, D) float32 on CPU.

    Raises:
        StopRequestedError: ``opts.stop`` returned True (on every rank at the same batch).
    """
    loader = opts.loader(dataset, comm.rank, comm.world_size)
    n_local = len(range(comm.rank, len(dataset), comm.world_size))
    indices = torch.empty(n_local, dtype=torch.long)
    feats: Tensor | None = None  # (n_local, D), allocated once D is known: no list + cat copy
    batches, filled = 0, 0
    # every rank has this many batches: the stop agreement (a collective) is asked only there
    common_batches = -(-(len(dataset) // comm.world_size) // opts.batch_size)
    grad_off = torch.no_grad() if opts.collective else torch.inference_mode()
    with grad_off, opts.autocast():
        for images, index in tqdm(loader, desc=opts.desc, disable=not opts.progress, leave=False):
            out = embed(opts.input(images)).float().cpu()
            if feats is None:
                feats = torch.empty(n_local, out.shape[1])
            feats[filled : filled + len(index)] = out
            indices[filled : filled + len(index)] = index
            filled, batches = filled + len(index), batches + 1
            asked = opts.stop is not None and (batches - 1) % opts.stop_every == 0
            if asked and batches <= common_batches and opts.stop():  # type: ignore[misc]
                raise StopRequestedError
        # the largest shard's batch count; shards differ by at most one sample
        largest_shard = -(-len(dataset) // comm.world_size)
        lockstep = -(-largest_shard // opts.batch_size)
        extra = lockstep - batches if opts.collective else 0
        probe = None
        for _ in range(max(extra, 0 if batches else 1)):  # in step; or learn D on an empty shard
            probe = embed(opts.input(dataset[0][0][None]))
    if feats is None:
        assert probe is not None
        return indices, torch.empty(0, probe.shape[1])
    return indices, feats


def extract_all(
    embed: Callable[[Tensor], Tensor], dataset: Any, comm: Comm, opts: ExtractOptions
) -> Tensor | None:
    """(N, D) features of the whole dataset on rank 0 (None elsewhere): sharded extraction,
    then :func:`gather_by_index`."""
    indices, feats = extract_shard(embed, dataset, comm, opts)
    return gather_by_index(indices, feats, len(dataset), comm)


def gather_by_index(indices: Tensor, feats: Tensor, n: int, comm: Comm) -> Tensor | None:
    """Assemble the (N, D) matrix on rank 0 by dataset index (None on other ranks).

    Shards differ in size by at most one row; they are padded with index -1 for the collective
    and the padding is dropped by index. Raises when any index is missing or repeated.
    """
    gathered = _gather_padded(indices, feats, -(-n // comm.world_size), comm)  # ceil
    if gathered is None:
        return None
    flat_idx, flat_val = gathered
    counts = torch.bincount(flat_idx, minlength=n)
    if flat_idx.numel() != n or counts.numel() != n or not bool((counts == 1).all()):
        missing = int((counts[:n] == 0).sum())
        raise RuntimeError(
            f"E-step coverage check failed: {flat_idx.numel()} features for N={n} samples, "
            f"{missing} indices missing"
        )
    out = torch.empty(n, feats.shape[1], dtype=feats.dtype)
    out[flat_idx] = flat_val
    return out


def gather_rows(indices: Tensor, feats: Tensor, wanted: Tensor, comm: Comm) -> Tensor | None:
    """The rows with global indices ``wanted`` (S,), ascending, on rank 0 in that order.

    Each rank sends only its rows of the sample (padded to the largest share), so rank 0's
    memory and everyone's traffic are O(S) whatever N. None on the other ranks.
    """
    mine = torch.isin(indices, wanted)
    idx, val = indices[mine], feats[mine]
    gathered = _gather_padded(idx, val, comm.max_over_ranks(idx.numel()), comm)
    if gathered is None:
        return None
    flat_idx, flat_val = gathered
    if flat_idx.numel() != wanted.numel():
        raise RuntimeError(f"sample coverage check failed: {flat_idx.numel()} of {wanted.numel()}")
    out = torch.empty(wanted.numel(), feats.shape[1], dtype=feats.dtype)
    out[torch.searchsorted(wanted, flat_idx)] = flat_val
    return out


def all_gather_by_index(indices: Tensor, values: Tensor, n: int, comm: Comm) -> Tensor:
    """(N,) values on every rank from each rank's strided shard ``range(rank, N, world)``.

    The indices are known from the stride, so only the values travel; each rank checks locally
    that it holds exactly its stride (the coverage check, without gathering N indices).
    """
    expected = torch.arange(comm.rank, n, comm.world_size)
    if not torch.equal(indices.cpu().long(), expected):
        raise RuntimeError(
            f"E-step coverage check failed on rank {comm.rank}: {indices.numel()} rows that are "
            f"not the strided shard range({comm.rank}, {n}, {comm.world_size})"
        )
    width = -(-n // comm.world_size)
    padded = torch.cat([values.cpu(), values.new_zeros(width - values.shape[0]).cpu()])
    gathered = comm.all_gather_cat(padded).view(comm.world_size, width)  # row r: rank r's shard
    return gathered.t().reshape(-1)[:n].clone()  # position j * W + r is index j * W + r


def _gather_padded(
    indices: Tensor, values: Tensor, width: int, comm: Comm
) -> tuple[Tensor, Tensor] | None:
    """Every rank's (index, row) pairs on rank 0, each share padded to ``width`` rows for the
    collective (index -1) and the padding dropped; None on the other ranks."""
    pad = width - indices.shape[0]
    idx = torch.cat([indices.long(), torch.full((pad,), -1, dtype=torch.long)])
    val = torch.cat([values, values.new_zeros(pad, values.shape[1])])
    all_idx, all_val = comm.gather_to_main(idx), comm.gather_to_main(val)
    if all_idx is None or all_val is None:
        return None
    flat_idx, flat_val = torch.cat(all_idx), torch.cat(all_val)
    keep = flat_idx >= 0
    return flat_idx[keep], flat_val[keep]
