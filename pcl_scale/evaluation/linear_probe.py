"""Linear classification on frozen features.

Two protocols:

* :func:`linear_probe` (the fast path, for precomputed features of small sets): multinomial
  logistic regression trained full-batch with L-BFGS on standardised features; the weight decay
  is chosen on a validation part held out of the training split (never on the test split), then
  the classifier is refitted on the whole training split and scored once on the test split.
* :func:`linear_reference` is the reference ImageNet protocol (PCL_SPEC 2.1): frozen backbone in
  eval mode, fresh fc with N(0, 0.01) weights, SGD lr 5.0, momentum 0.9, no weight decay, batch
  256, 100 epochs, x0.1 at 60 and 80, RandomResizedCrop + flip on the training images, the eval
  view on the test images, top-1 every epoch and the last epoch's reported (no selection). It
  runs data-parallel over the processes (``pcl-scale eval eval.protocols=[linear_reference]``):
  each rank embeds its share of every global batch, the fc gradients are all-reduced (K x D per
  step, as DDP would), and each rank scores its stride of the test images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from pcl_scale.core.seeds import mix_seed
from pcl_scale.distributed.comm import Comm
from pcl_scale.evaluation.metrics import topk_accuracy

DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class ReferenceSchedule:
    lr: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 100
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1


def reference_schedule() -> ReferenceSchedule:
    return ReferenceSchedule()


def _split_validation(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified train/validation indices: ``fraction`` of each class (at least one) held out."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def fit_logistic(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> torch.nn.Linear:
    """Full-batch L-BFGS on cross-entropy + weight_decay / 2 * ||W||^2 (bias not decayed)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1/top-5 (%) on the test split at the weight decay that is best on validation."""
    mean = train_feats.float().mean(0)
    std = train_feats.float().std(0).clamp_min(1e-6)
    xs, xt = (train_feats.float() - mean) / std, (test_feats.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    tr, va = _split_validation(train_labels, val_fraction, seed)
    best_wd, best_val = weight_decays[0], -1.0
    for wd in weight_decays:
        model = fit_logistic(xs[tr], train_labels[tr], num_classes, wd)
        with torch.no_grad():
            val = topk_accuracy(model(xs[va]), train_labels[va], (1,))[1]
        if val > best_val:
            best_wd, best_val = wd, val
    model = fit_logistic(xs, train_labels, num_classes, best_wd)
    with torch.no_grad():
        acc = topk_accuracy(model(xt), test_labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "weight_decay": best_wd, "val_top1": best_val}


def _reference_lr(schedule: ReferenceSchedule, epoch: int) -> float:
    return schedule.lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)


class GlobalBatchShare(torch.utils.data.Sampler[list[int]]):
    """This rank's share (every W-th element) of each global batch of one epoch's permutation.

    The permutation depends on (seed, epoch) only, so the union of the shares over W ranks is the
    one-process batch; a last batch smaller than W (some rank would get nothing) is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, comm: Comm) -> None:
        self.n, self.batch_size, self.comm = n, batch_size, comm
        self.generator = torch.Generator().manual_seed(mix_seed(seed, epoch))

    def global_size(self, step: int) -> int:
        """How many images global batch ``step`` holds over all ranks."""
        return min(self.batch_size, self.n - step * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator, dtype=torch.int32)
        for step in range(len(self)):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield batch[self.comm.rank :: self.comm.world_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + int(rest >= self.comm.world_size)


def linear_reference(
    encoder: torch.nn.Module,
    train_images: Any,
    train_labels: Tensor,
    test_images: Any,
    test_labels: Tensor,
    schedule: ReferenceSchedule = ReferenceSchedule(),
    device: torch.device | None = None,
    seed: int = 0,
    comm: Comm | None = None,
) -> dict[str, object]:
    """Train a linear classifier on a frozen encoder through augmented images, data-parallel.

    Every rank holds the same fc (same seeded init, all-reduced gradients of the summed loss over
    the global batch); W processes take the one-process steps up to float summation order.

    Args:
        encoder: maps a (B, 3, H, W) batch to (B, F) features; kept in eval mode and unchanged.
        train_images / test_images: yield ``(image tensor, dataset index)`` (augmented / eval view).
        train_labels / test_labels: (N,) labels by dataset index.

    Returns:
        ``top1``/``top5`` (%) of the last epoch and ``top1_per_epoch`` (the same on every rank).
    """
    comm = comm or Comm()
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    before = [p.detach().clone() for p in encoder.parameters()]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fc = _initial_fc(encoder, train_images, num_classes, seed, device)
    opt = torch.optim.SGD(
        fc.parameters(), schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    test_share = Subset(test_images, range(comm.rank, len(test_images), comm.world_size))
    per_epoch, acc = [], {1: 0.0, 5: 0.0}
    for epoch in range(schedule.epochs):
        for group in opt.param_groups:
            group["lr"] = _reference_lr(schedule, epoch)
        share = GlobalBatchShare(len(train_images), schedule.batch_size, seed, epoch, comm)
        for step, (images, index) in enumerate(DataLoader(train_images, batch_sampler=share)):
            feats = _frozen(encoder, images, device)
            targets = train_labels[index].long().to(device)
            loss = F.cross_entropy(fc(feats), targets, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for param in fc.parameters():  # the mean over the global batch, as on one process
                assert param.grad is not None
                param.grad = comm.all_reduce_sum(param.grad) / share.global_size(step)
            opt.step()
        acc = sharded_topk(encoder, fc, test_share, test_labels, schedule.batch_size, device, comm)
        per_epoch.append(acc[1])
    unchanged = all(torch.equal(a, b) for a, b in zip(before, encoder.parameters(), strict=True))
    if not unchanged:
        raise RuntimeError("the frozen encoder changed during linear evaluation")
    return {"top1": acc[1], "top5": acc[5], "top1_per_epoch": per_epoch}


def _frozen(encoder: torch.nn.Module, images: Tensor, device: torch.device) -> Tensor:
    with torch.no_grad():
        return encoder(images.to(device))


def _initial_fc(
    encoder: torch.nn.Module, images: Any, num_classes: int, seed: int, device: torch.device
) -> torch.nn.Linear:
    """A fresh fc, N(0, 0.01) weights and zero bias, from ``seed`` (the same on every rank)."""
    width = _frozen(encoder, images[0][0][None], device).shape[1]
    fc = torch.nn.Linear(width, num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 0.01)
        fc.bias.zero_()
    return fc


def sharded_topk(
    encoder: torch.nn.Module,
    fc: torch.nn.Module,
    images: Any,
    labels: Tensor,
    batch_size: int,
    device: torch.device,
    comm: Comm,
) -> dict[int, float]:
    """Top-1/top-5 (%) over every rank's test images: hits counted locally, then all-reduced."""
    hits = torch.zeros(3, dtype=torch.int64)  # top-1 hits, top-5 hits, images
    with torch.no_grad():
        for batch, index in DataLoader(images, batch_size=batch_size):
            scores = fc(_frozen(encoder, batch, device)).cpu()
            ranked = scores.argsort(dim=1, descending=True)[:, :5]
            hit = ranked == labels[index].long()[:, None]
            hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(index))])
    hits = comm.all_reduce_sum(hits)
    top1, top5, total = hits.tolist()
    return {1: 100.0 * top1 / total, 5: 100.0 * top5 / total}
