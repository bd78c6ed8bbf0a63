"""Backbones, projection heads and the two-encoder PCL model.

``PCLModel`` holds the online encoder (query, trained by SGD), the momentum encoder (key, an EMA of
the online one, no gradient) and the key queue. It never calls collectives and never picks a
device: the training loop gathers keys across ranks before :meth:`PCLModel.enqueue`, and moves the
model where it wants it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESNETS = ("resnet18", "resnet34", "resnet50")  # built with torchvision
VITS = {  # short names of timm ViTs whose patch size comes from model.patch_size
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
HeadKind = Literal["linear", "mlp"]


@dataclass(frozen=True)
class BackboneSpec:
    """What to build: a torchvision ResNet (``RESNETS``), a short ViT name (``VITS``) or any timm
    model name. ``small_stem`` applies to the torchvision ResNets; ``img_size`` to timm models
    with a fixed input size (ViTs); ``patch_size`` to the short ViT names."""

    name: str = "resnet50"
    small_stem: bool = False
    img_size: int = 224
    patch_size: int = 16


def backbone_library(name: str) -> Literal["torchvision", "timm"]:
    """Which library builds ``name``: torchvision for ``RESNETS``, timm for everything else it
    knows; a ValueError naming close matches otherwise."""
    if name in RESNETS:
        return "torchvision"
    import timm

    if name in VITS:
        return "timm"
    if timm.is_model(name):
        architecture, _, tag = name.partition(".")
        if tag:  # weights, not an architecture: the backbone starts random either way
            raise ValueError(
                f"backbone={name!r} names pretrained weights: use the architecture "
                f"{architecture!r} and start from the weights with model.init_from=timm:{name}"
            )
        return "timm"
    raise ValueError(f"backbone={name!r} is unknown{unknown_backbone_hint(name)}")


def timm_pretrained_cfg(name: str) -> Any:
    """timm's ``PretrainedCfg`` of ``arch`` or ``arch.tag``; None for a name or tag timm lacks."""
    import timm.models

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        return None


def unknown_backbone_hint(name: str) -> str:
    """The closest known names and where the names come from, for an unknown backbone."""
    import difflib

    import timm

    names = list(dict.fromkeys([*RESNETS, *VITS, *timm.list_models()]))
    close = difflib.get_close_matches(name, names, n=3)
    closest = f" (closest: {', '.join(close)})" if close else ""
    return (
        f"{closest}: use {', '.join((*RESNETS, *VITS))} or a timm model name (timm.list_models())"
    )


def timm_arguments(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """The timm architecture and the ``create_model`` arguments of a timm backbone: pooled
    features (``num_classes=0``), the run's image size where the input size is fixed (ViTs), and
    the patch size of the short ViT names."""
    architecture = VITS.get(spec.name, spec.name)
    kwargs: dict[str, Any] = {"num_classes": 0}
    default = timm_pretrained_cfg(architecture)
    if default is not None and default.fixed_input_size:
        kwargs["img_size"] = spec.img_size
    if spec.name in VITS:
        kwargs["patch_size"] = spec.patch_size
    return architecture, kwargs


def build_backbone(spec: BackboneSpec) -> tuple[nn.Module, int]:
    """A backbone that maps (B, 3, H, W) images to (B, F) pooled features.

    ResNets of ``RESNETS`` are torchvision models with ``fc`` replaced by Identity (optionally
    with the small-image stem: 3x3 stride-1 ``conv1`` and no max-pool); every other name is a
    timm model built with ``num_classes=0``. Parameter names stay the library's, so an exported
    state dict loads into the plain library model.

    Returns:
        The module and its feature size F.
    """
    if backbone_library(spec.name) == "torchvision":
        import torchvision

        net = getattr(torchvision.models, spec.name)(weights=None)
        if spec.small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        num_features = int(net.fc.in_features)
        net.fc = nn.Identity()
        return net, num_features
    import timm

    architecture, kwargs = timm_arguments(spec)
    try:
        net = timm.create_model(architecture, pretrained=False, **kwargs)
    except Exception as err:  # timm's asserts and shape errors for sizes a model cannot take
        raise ValueError(
            f"timm cannot build {architecture!r} for {spec.img_size} px images "
            f"({type(err).__name__}: {err}): choose another image size or backbone"
        ) from err
    timm_features = net.num_features
    assert isinstance(timm_features, int)
    return net, timm_features


def load_matching(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` with every key and shape matching; a ValueError naming the
    first mismatches and ``source`` otherwise (weights of another architecture)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shapes", reshaped),
            )
            if items
        ]
        raise ValueError(
            f"the weights of {source} do not fit this model ({'; '.join(problems)}): "
            "start from weights of the same architecture (model.backbone, model.small_stem)"
        )
    module.load_state_dict(state, strict=True)


def build_head(
    kind: HeadKind, in_dim: int, out_dim: int, hidden_dim: int | None = None
) -> nn.Module:
    """Projection head: ``linear`` (PCL v1) or ``mlp`` = Linear-ReLU-Linear, no BN (PCL v2)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = hidden_dim or in_dim
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )
    raise ValueError(f"unknown projection head {kind!r}: use 'linear' (PCL v1) or 'mlp' (PCL v2)")


class Encoder(nn.Module):
    """Backbone followed by the projection head; outputs un-normalised (B, dim) embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))  # (B, dim)


def _is_whole(p: Tensor) -> bool:
    """Whether a ZeRO-3 parameter's full value is currently materialised in ``.data``."""
    return p.data.numel() == getattr(p, "ds_numel")  # noqa: B009


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online over parameters only.

    Buffers (BatchNorm running statistics) are not averaged, as in MoCo/PCL.

    Under ZeRO-3 a parameter's authoritative value is the partition ``ds_tensor`` that each rank
    owns (the two encoders are partitioned alike), so each rank updates its partitions and no
    parameter is gathered. A momentum-encoder parameter that is also materialised whole (a small
    "persistent" one, or one still gathered after a forward) is updated whole when its online
    twin is whole too, and released otherwise, so that its next use gathers the new value.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    # Any: ZeRO-3 adds ds_tensor, ds_shape and partition() to its parameters
    t_params: list[Any] = list(target.parameters())
    o_params: list[Any] = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("online and momentum encoders have different parameter lists")
    t_local: list[Tensor] = []
    o_local: list[Tensor] = []
    stale: list[Any] = []
    for t, o in zip(t_params, o_params, strict=True):
        if not hasattr(t, "ds_tensor"):
            t_local.append(t.data)
            o_local.append(o.data)
            continue
        if t.ds_tensor.shape != o.ds_tensor.shape:
            raise ValueError(
                f"momentum encoder parameter {tuple(t.ds_shape)} is partitioned unlike its "
                "online twin: both encoders must be prepared in the same model"
            )
        t_local.append(t.ds_tensor.data)
        o_local.append(o.ds_tensor.data)
        if _is_whole(t):
            if _is_whole(o):
                t_local.append(t.data)
                o_local.append(o.data)
            else:
                stale.append(t)
    torch._foreach_mul_(t_local, m)
    torch._foreach_add_(t_local, o_local, alpha=1.0 - m)
    for t in stale:
        t.partition(has_been_updated=False)  # drop the old whole copy; the partition is new


class PCLModel(nn.Module):
    """Online encoder, momentum encoder and key queue of PCL (MoCo-style).

    Args:
        backbone: which backbone to build.
        dim: embedding size (128 in PCL).
        head: ``linear`` (v1) or ``mlp`` (v2).
        queue_size: r, the number of queued keys.
        mlp_hidden_dim: hidden width of the MLP head (default: the backbone's feature size).
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        backbone: BackboneSpec,
        dim: int = 128,
        head: HeadKind = "linear",
        queue_size: int = 16384,
        mlp_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        net, num_features = build_backbone(backbone)
        self.encoder_q = Encoder(net, build_head(head, num_features, dim, mlp_hidden_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.dim = dim
        self.num_features = num_features
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (r, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, im_q: Tensor, im_k: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Normalised query embeddings (B, dim), and key embeddings (B, dim) when ``im_k`` is given.

        The key encoder runs without gradient; call :meth:`momentum_update` before this, as the
        reference does at the start of each training forward.
        """
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (B, D)
        k = None
        if im_k is not None:
            with torch.no_grad():
                k = F.normalize(self.encoder_k(im_k), dim=1)  # (B, D)
        return q, k

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """E-step features: normalised momentum-encoder embeddings (B, dim)."""
        return F.normalize(self.encoder_k(x), dim=1)

    @torch.no_grad()
    def start_from(
        self, backbone: dict[str, Tensor], source: str, head: dict[str, Tensor] | None = None
    ) -> None:
        """Both encoders start from ``backbone`` weights (and ``head``'s, when given): the
        momentum encoder is a copy of the online one, as at initialisation."""
        load_matching(self.encoder_q.backbone, backbone, source)
        if head is not None:
            load_matching(self.encoder_q.head, head, source)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """EMA of the online encoder into the momentum encoder (parameters only)."""
        ema_update(self.encoder_q, self.encoder_k, m)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (n, dim), gathered over all ranks, at the pointer, wrapping around."""
        r = self.queue.shape[0]
        n = keys.shape[0]
        if n > r:
            raise ValueError(f"cannot enqueue {n} keys into a queue of size r={r}: raise r")
        slots = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % r  # (n,)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % r)
