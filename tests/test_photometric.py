"""Batched device photometric augmentations against torchvision's per-image tensor functions."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import functional as TF

from pcl_scale.core import photometric as P


def images(n: int = 6, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "batched, reference",
    [
        (P.brightness, TF.adjust_brightness),
        (P.contrast, TF.adjust_contrast),
        (P.saturation, TF.adjust_saturation),
    ],
)
def test_blends_equal_torchvision_per_image(batched, reference):
    x = images()
    f = torch.linspace(0.6, 1.4, x.shape[0])
    expected = torch.stack([reference(img, float(v)) for img, v in zip(x, f, strict=True)])
    torch.testing.assert_close(batched(x, f), expected, rtol=0, atol=1e-6)


def test_hue_equals_torchvision_per_image():
    x = images()
    x[0] = 0.5  # a grey image: no hue to rotate
    shift = torch.linspace(-0.4, 0.4, x.shape[0])
    expected = torch.stack([TF.adjust_hue(img, float(v)) for img, v in zip(x, shift, strict=True)])
    torch.testing.assert_close(P.hue(x, shift), expected, rtol=0, atol=1e-5)


def test_blur_equals_torchvision_per_image():
    x = images(4, 16)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    expected = torch.stack(
        [
            TF.gaussian_blur(img, [7, 7], [float(s), float(s)])
            for img, s in zip(x, sigma, strict=True)
        ]
    )
    torch.testing.assert_close(P.gaussian_blur(x, sigma, 7), expected, rtol=0, atol=1e-5)


def test_grayscale_is_torchvisions():
    x = images()
    torch.testing.assert_close(P.grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)


def jitter_reference(aug: P.Photometric, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Replays the draws of colour_jitter and applies torchvision's functions image by image."""
    n = x.shape[0]
    b, c, s, h = aug.jitter
    chosen = torch.rand(n, generator=gen) < aug.jitter_p
    lows, highs = [1 - b, 1 - c, 1 - s, -h], [1 + b, 1 + c, 1 + s, h]
    factors = [
        lo + (hi - lo) * torch.rand(n, generator=gen) for lo, hi in zip(lows, highs, strict=True)
    ]
    order = torch.randperm(4, generator=torch.Generator().manual_seed(gen.initial_seed()))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i in range(n):
        img = x[i]
        if chosen[i]:
            for op_id in order.tolist():
                img = ops[op_id](img, float(factors[op_id][i]))
        out.append(img)
    return torch.stack(out)


def test_colour_jitter_applies_each_images_own_factors():
    aug = P.photometric_for("aug_plus", 12)
    x = images(16)
    got = aug.colour_jitter(x, torch.Generator().manual_seed(3))
    expected = jitter_reference(aug, x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, x)


@pytest.mark.parametrize("aug", ["aug", "aug_plus"])
def test_recipes_are_seeded_and_keep_the_range(aug):
    recipe = P.photometric_for(aug, 32)
    x = images(64, 32)
    a = recipe(x, torch.Generator().manual_seed(1))
    b = recipe(x, torch.Generator().manual_seed(1))
    c = recipe(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-5  # blur: rounding only
    gray = (a.max(dim=1).values - a.min(dim=1).values).amax(dim=(1, 2)) < 1e-6
    assert 0 < int(gray.sum()) < 64  # about 20% made grayscale (13 expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ops_equal_the_cpu_ops():
    """The batched ops on a CUDA batch give the CPU results (same parameters)."""
    x = images(8, 32)
    f = torch.linspace(0.6, 1.4, 8)
    sigma = torch.linspace(0.2, 2.0, 8)
    for op, arg in ((P.contrast, f), (P.saturation, f), (P.hue, f - 1.0)):
        torch.testing.assert_close(op(x.cuda(), arg.cuda()).cpu(), op(x, arg), atol=1e-5, rtol=0)
    blurred = P.gaussian_blur(x.cuda(), sigma.cuda(), 13).cpu()
    torch.testing.assert_close(blurred, P.gaussian_blur(x, sigma, 13), atol=1e-5, rtol=0)
    out = P.photometric_for("aug_plus", 224)(x.cuda(), torch.Generator("cuda").manual_seed(0))
    assert out.is_cuda and out.shape == x.shape


def test_color_jitter_option_reaches_both_pipelines():
    from torchvision import transforms as T

    from pcl_scale.config import DataConfig
    from pcl_scale.data import train_transform

    cfg = DataConfig(aug="aug_plus", image_size=12, color_jitter=[0.3, 0.2, 0.0, 0.0])
    view = train_transform(cfg).transform
    assert isinstance(view, T.Compose)
    pil = [op for op in view.transforms if isinstance(op, T.RandomApply)]
    jitter = pil[0].transforms[0]
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == (0.7, 1.3) and jitter.contrast == (0.8, 1.2)
    assert jitter.saturation is None and jitter.hue is None
    assert P.photometric_for("aug_plus", 12, cfg.color_jitter).jitter == (0.3, 0.2, 0.0, 0.0)
    assert P.photometric_for("aug_plus", 12).jitter == (0.4, 0.4, 0.4, 0.1)  # the reference's
    assert P.photometric_for("aug", 12).jitter == (0.4, 0.4, 0.4, 0.4)


def test_saturation_and_hue_leave_gray_images_unchanged():
    """Why a gray-image recipe can drop them: on three equal channels they are the identity."""
    gray = images().mean(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    only_colour = P.Photometric((0.0, 0.0, 0.4, 0.4), 1.0, 0.0, False)
    out = only_colour(gray, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, gray, atol=1e-4, rtol=0)  # luma weights sum to 0.9999
    coloured = images()
    assert not torch.allclose(only_colour(coloured, torch.Generator().manual_seed(0)), coloured)


@pytest.mark.parametrize("bad", ["[0.4,0.4]", "[0.4,0.4,0.4,0.6]", "[-0.1,0,0,0]"])
def test_a_bad_color_jitter_is_refused(bad):
    from pcl_scale.config import ConfigError, load_config
    from pcl_scale.validation import validate

    with pytest.raises(ConfigError, match=r"data\.color_jitter=.*needs 4 values"):
        validate(load_config(None, [f"data.color_jitter={bad}"]))
