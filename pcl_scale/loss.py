"""InfoNCE and ProtoNCE: the PCL loss (Li et al., ICLR 2021, eq. 11, as the reference computes it).

    L = CE([q.k, q.queue] / T, 0)                                   (InfoNCE, instance term)
      + 1/M * sum_m CE([q.c^m_pos, q.c^m_neg] / phi^m, arange(B))   (ProtoNCE, per granularity)

Each prototype column is divided by that prototype's concentration phi. As in the reference the
positives of the whole local batch come first (target of row i is column i), then r sampled
negatives, so other samples' positives act as extra negatives. With instance prototypes and
phi = T the ProtoNCE term reduces to InfoNCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_scale.clusters import ClusterResult
from pcl_scale.negatives import sample_negative_prototypes


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


def protonce_logits(
    q: Tensor, prototypes: Tensor, phi: Tensor, pos_ids: Tensor, neg_ids: Tensor
) -> Tensor:
    """Prototype logits, each column divided by its prototype's concentration.

    Args:
        q: (B, D) normalised queries.
        prototypes: (K, D) normalised prototypes.
        phi: (K,) concentrations.
        pos_ids: (B,) positive prototype of each sample; target of row i is column i.
        neg_ids: (r,) sampled negative prototypes.

    Returns:
        (B, B + r) float32 logits.
    """
    ids = torch.cat([pos_ids, neg_ids])  # (B + r,)
    selected = prototypes[ids].float()  # (B + r, D)
    return (q.float() @ selected.t()) / phi[ids].float()  # (B, B + r)


def top1(logits: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent (a 0-dim tensor)."""
    return (logits.argmax(dim=1) == target).float().mean() * 100.0


def pcl_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    index: Tensor,
    temperature: float,
    clusters: ClusterResult | None,
    r: int,
    generator: torch.Generator,
) -> LossOutput:
    """InfoNCE + mean over granularities of ProtoNCE (InfoNCE only when ``clusters`` is None).

    Args:
        q: (B, D) normalised queries of the local batch (with gradient).
        k: (B, D) normalised keys.
        queue: (r_queue, D) negatives for the instance term.
        index: (B,) dataset index of each sample.
        temperature: InfoNCE temperature T.
        clusters: the E-step result, or None during warm-up.
        r: number of negative prototypes per granularity.
        generator: seeded generator for the negative draws.
    """
    logits = infonce_logits(q, k, queue, temperature)
    zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss_inst = F.cross_entropy(logits, zeros)
    acc_inst = top1(logits, zeros)
    if clusters is None or len(clusters) == 0:
        return LossOutput(loss=loss_inst, loss_inst=loss_inst, acc_inst=acc_inst)

    target = torch.arange(q.shape[0], device=q.device)
    proto_losses, proto_accs = [], []
    for c in clusters.clusterings:
        pos_ids = c.assignments[index].long()  # (B,)
        neg_ids = sample_negative_prototypes(pos_ids, c.num_prototypes, r, generator)
        proto_logits = protonce_logits(q, c.prototypes, c.phi, pos_ids, neg_ids)
        proto_losses.append(F.cross_entropy(proto_logits, target))
        proto_accs.append(top1(proto_logits, target))
    loss_proto = torch.stack(proto_losses).mean()
    return LossOutput(
        loss=loss_inst + loss_proto,
        loss_inst=loss_inst,
        acc_inst=acc_inst,
        loss_proto=loss_proto,
        acc_proto=torch.stack(proto_accs).mean(),
    )
