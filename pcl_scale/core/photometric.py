"""The photometric augmentations of ``aug`` and ``aug_plus``, batched on the device.

Colour jitter (brightness, contrast, saturation, hue; per-image factors, the order drawn per
batch), random grayscale and Gaussian blur, with per-image random parameters drawn from a
generator on the images' device and no host synchronisation. The formulas are torchvision's
tensor ones (``adjust_*``, ``rgb_to_grayscale``, ``gaussian_blur``), so CPU workers only decode,
crop and flip (``data.photometric=device``); they are the same distributions as the PIL
pipeline's, not the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's rgb_to_grayscale


def grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1]; ``ratio`` is (B,)."""
    r = ratio.view(-1, 1, 1, 1)
    return (r * x + (1 - r) * other).clamp_(0, 1)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, torch.zeros_like(x), f)


def contrast(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return blend(x, grayscale(x), f)


def hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (B,) turns, through HSV as torchvision's adjust_hue."""
    h, s, v = rgb_to_hsv(x)
    h = (h + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(h, s, v)


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return (h / 6.0) % 1.0, s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    table = torch.stack(  # (6 sectors, 3 channels, B, H, W)
        [
            torch.stack([v, t, p]),
            torch.stack([q, v, p]),
            torch.stack([p, v, t]),
            torch.stack([p, q, v]),
            torch.stack([t, p, v]),
            torch.stack([v, p, q]),
        ]
    )
    index = i[None, None].expand(1, 3, *i.shape)
    return table.gather(0, index)[0].permute(1, 0, 2, 3)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, one sigma (B,) per image, reflect padding (torchvision's)."""
    b, c, hgt, wid = x.shape
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (pos[None] / sigma.to(x.dtype)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B C, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, hgt, wid), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # along W
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # along H
    return y.view(b, c, hgt, wid)


@dataclass(frozen=True)
class Photometric:
    """One recipe's photometric augmentations, applied to a (B, 3, H, W) batch in [0, 1].

    ``aug`` (PCL v1): grayscale (p = 0.2), then jitter (0.4, 0.4, 0.4, 0.4) always.
    ``aug_plus`` (PCL v2): jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale (p = 0.2), blur
    with sigma ~ U[lo, hi] (p = 0.5).
    """

    jitter: tuple[float, float, float, float]
    jitter_p: float
    gray_p: float
    gray_first: bool
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.gray_first:
            x = self.random_grayscale(x, gen)
        x = self.colour_jitter(x, gen)
        if not self.gray_first:
            x = self.random_grayscale(x, gen)
        return self.random_blur(x, gen) if self.blur_p else x

    def uniform(self, n: int, lo: float, hi: float, gen: torch.Generator, like: Tensor) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=like.device, dtype=like.dtype)

    def colour_jitter(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Each image gets its own four factors (identity when it is not selected); the order of
        the four adjustments is drawn once per batch (from a host generator seeded from
        ``gen``), so no step waits for the device: each image's marginal distribution is
        torchvision's, the orders of images in one batch are shared."""
        n = x.shape[0]
        b, c, s, h = self.jitter
        chosen = torch.rand(n, generator=gen, device=x.device, dtype=x.dtype) < self.jitter_p
        draws = (
            self.uniform(n, max(0.0, 1 - b), 1 + b, gen, x),
            self.uniform(n, max(0.0, 1 - c), 1 + c, gen, x),
            self.uniform(n, max(0.0, 1 - s), 1 + s, gen, x),
            self.uniform(n, -h, h, gen, x),
        )
        identity = (1.0, 1.0, 1.0, 0.0)
        factors = [
            torch.where(chosen, f, torch.full_like(f, i))
            for f, i in zip(draws, identity, strict=True)
        ]
        order = torch.randperm(4, generator=torch.Generator().manual_seed(gen.initial_seed()))
        ops = (brightness, contrast, saturation, hue)
        for op_id in order.tolist():
            x = ops[op_id](x, factors[op_id])
        return x

    def random_grayscale(self, x: Tensor, gen: torch.Generator) -> Tensor:
        chosen = torch.rand(x.shape[0], generator=gen, device=x.device) < self.gray_p
        return torch.where(chosen.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)

    def random_blur(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """The whole batch is blurred and the selected images kept blurred (no host sync)."""
        n = x.shape[0]
        chosen = torch.rand(n, generator=gen, device=x.device) < self.blur_p
        sigma = self.uniform(n, *self.blur_sigma, gen, x)
        size = 2 * math.ceil(3 * self.blur_sigma[1]) + 1  # +-3 sigma of the widest blur
        size = min(size, 2 * (min(x.shape[-2:]) - 1) - 1) | 1  # reflect padding < image side
        return torch.where(chosen.view(-1, 1, 1, 1), gaussian_blur(x, sigma, max(size, 1)), x)


def jitter_of(aug: str, color_jitter: Sequence[float] = ()) -> tuple[float, float, float, float]:
    """Brightness, contrast, saturation and hue of the colour jitter: ``color_jitter`` when given,
    else the aug's own (hue 0.4 for ``aug``, 0.1 for ``aug_plus``)."""
    if color_jitter:
        b, c, s, h = (float(v) for v in color_jitter)
        return b, c, s, h
    return (0.4, 0.4, 0.4, 0.1) if aug == "aug_plus" else (0.4, 0.4, 0.4, 0.4)


def photometric_for(aug: str, image_size: int, color_jitter: Sequence[float] = ()) -> Photometric:
    """The photometric half of ``aug`` / ``aug_plus`` at ``image_size`` (blur scaled as the PIL
    pipeline's: sigma ~ U[0.1, 2.0] px at 224 px)."""
    jitter = jitter_of(aug, color_jitter)
    if aug == "aug_plus":
        scale = image_size / 224.0
        return Photometric(jitter, 0.8, 0.2, False, 0.5, (0.1 * scale, 2.0 * scale))
    return Photometric(jitter, 1.0, 0.2, True)
