"""InfoNCE and ProtoNCE: the PCL loss (Li et al., ICLR 2021, eq. 11, as the reference computes it).

    L = CE([q.k, q.queue] / T, 0)                                   (InfoNCE, instance term)
      + 1/M * sum_m CE([q.c^m_pos, q.c^m_neg] / phi^m, arange(B))   (ProtoNCE, per granularity)

Each prototype column is divided by that prototype's concentration phi. As in the reference the
positives of the whole local batch come first (target of row i is column i), then r sampled
negatives, so other samples' positives act as extra negatives. With instance prototypes and
phi = T the ProtoNCE term reduces to InfoNCE.

All M granularities are computed together: one negative draw, one gather from a table of
prototypes already divided by their phi, one matmul and one cross-entropy over the B x M rows,
so the prototype term adds a handful of kernels to a step rather than dozens per granularity.
The loss is computed in float32 with autocast disabled: under bf16 autocast a matmul would round
the cosines to 8 bits of mantissa before they are divided by a temperature or a phi as small
as 0.05.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.core.clusters import ClusterResult


@dataclass(frozen=True)
class LossOutput:
    """Loss and its logged terms. ``loss_proto``/``acc_proto`` are None during warm-up."""

    loss: Tensor
    loss_inst: Tensor
    acc_inst: Tensor
    loss_proto: Tensor | None = None
    acc_proto: Tensor | None = None


def infonce_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Instance logits against the key and the queue; the target is column 0.

    Args:
        q: (B, D) normalised queries.
        k: (B, D) normalised keys (no gradient).
        queue: (r, D) normalised keys of earlier batches.
        temperature: T.

    Returns:
        (B, 1 + r) logits / T, computed in float32.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.t()  # (B, r)
    return torch.cat([pos, neg], dim=1) / temperature  # (B, 1 + r)


def protonce_logits(q: Tensor, scaled: Tensor, ids: Tensor) -> Tensor:
    """Prototype logits of every granularity in one matmul.

    Args:
        q: (B, D) normalised queries.
        scaled: (P, D) prototypes divided by their concentrations, c / phi
            (:attr:`pcl_scale.core.clusters.PrototypeTable.scaled`).
        ids: (M, B + r) rows of ``scaled`` per granularity: the positives of the local batch,
            then r negatives; the target of sample i at every granularity is column i.

    Returns:
        (B, M, B + r) float32 logits.
    """
    m, width = ids.shape
    selected = scaled[ids.flatten()]  # (M (B + r), D), float32
    return (q.float() @ selected.t()).view(-1, m, width)


def top1(logits: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent (a 0-dim tensor)."""
    return (logits.argmax(dim=1) == target).float().mean() * 100.0


@dataclass(frozen=True)
class PCLLoss:
    """InfoNCE + mean over granularities of ProtoNCE (InfoNCE only without clusters).

    Attributes:
        temperature: InfoNCE temperature T.
        r: negative prototypes per granularity.
    """

    temperature: float
    r: int

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        queue: Tensor,
        index: Tensor,
        clusters: ClusterResult | None,
        *,
        generator: torch.Generator,
    ) -> LossOutput:
        """The loss of one local batch, in float32 whatever the autocast state.

        Args:
            q: (B, D) normalised queries of the local batch (with gradient).
            k: (B, D) normalised keys.
            queue: (r_queue, D) negatives for the instance term.
            index: (B,) dataset index of each sample, where the assignments live (host memory).
            clusters: the E-step result, or None during warm-up.
            generator: seeded generator for the negative draws.
        """
        device_type = q.device.type
        in_float32 = (
            torch.autocast(device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with in_float32:
            logits = infonce_logits(q, k, queue, self.temperature)
            zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss_inst = F.cross_entropy(logits, zeros)
            acc_inst = top1(logits, zeros)
            if clusters is None or len(clusters) == 0:
                return LossOutput(loss=loss_inst, loss_inst=loss_inst, acc_inst=acc_inst)
            loss_proto, acc_proto = self.prototype_term(q, index, clusters, generator)
            return LossOutput(
                loss=loss_inst + loss_proto,
                loss_inst=loss_inst,
                acc_inst=acc_inst,
                loss_proto=loss_proto,
                acc_proto=acc_proto,
            )

    def prototype_term(
        self, q: Tensor, index: Tensor, clusters: ClusterResult, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """ProtoNCE averaged over granularities, and its top-1 accuracy (float32 inputs)."""
        table = clusters.table
        pos = clusters.positives(index).to(q.device, non_blocking=True)  # (M, B)
        neg = table.sampler(pos, self.r, generator)  # (M, r)
        ids = torch.cat([pos, neg], dim=1) + table.offsets  # (M, B + r) rows of the table
        # row i * M + m: sample i at granularity m, whose positive is column i
        proto_logits = protonce_logits(q, table.scaled, ids).flatten(0, 1)  # (B M, B + r)
        target = torch.arange(q.shape[0], device=q.device).repeat_interleave(len(clusters))
        # the mean over all B * M rows is the mean over granularities of each one's mean
        return F.cross_entropy(proto_logits, target), top1(proto_logits, target)
