import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pcl_scale.core.model import BackboneSpec, PCLModel, build_backbone, ema_update


def tiny_model(queue_size=10, dim=8):
    return PCLModel(BackboneSpec("resnet18", small_stem=True), dim=dim, queue_size=queue_size)


def perturb(model):
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))


def test_ema_m0_copies_and_m1_keeps():
    model = tiny_model()
    perturb(model)
    before = copy.deepcopy(model.encoder_k.state_dict())
    model.momentum_update(1.0)
    for name, t in model.encoder_k.state_dict().items():
        assert torch.equal(t, before[name]), name
    model.momentum_update(0.0)
    q_params = dict(model.encoder_q.named_parameters())
    for name, p in model.encoder_k.named_parameters():
        assert torch.equal(p, q_params[name]), name


def test_ema_matches_formula_and_skips_buffers():
    model = tiny_model()
    perturb(model)
    with torch.no_grad():
        model.encoder_q.backbone.bn1.running_mean.fill_(3.0)
    k_before = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    q_params = dict(model.encoder_q.named_parameters())
    model.momentum_update(0.99)
    for name, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.99 * k_before[name] + 0.01 * q_params[name])
    assert not torch.equal(
        model.encoder_k.backbone.bn1.running_mean, model.encoder_q.backbone.bn1.running_mean
    )


def test_ema_rejects_bad_momentum():
    model = tiny_model()
    with pytest.raises(ValueError, match="momentum"):
        ema_update(model.encoder_q, model.encoder_k, 1.5)


def test_queue_wraps_around():
    model = tiny_model(queue_size=10, dim=4)
    keys = F.normalize(torch.arange(1, 29, dtype=torch.float32).view(7, 4), dim=1)
    model.enqueue(keys)  # slots 0..6
    assert int(model.queue_ptr) == 7
    torch.testing.assert_close(model.queue[:7], keys)
    more = F.normalize(-torch.arange(1, 21, dtype=torch.float32).view(5, 4), dim=1)
    old_7_9 = model.queue[7:10].clone()
    model.enqueue(more)  # slots 7, 8, 9, 0, 1
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue[7:10], more[:3])
    torch.testing.assert_close(model.queue[0:2], more[3:])
    torch.testing.assert_close(model.queue[2:7], keys[2:7])
    assert not torch.equal(model.queue[7:10], old_7_9)
    with pytest.raises(ValueError, match="queue of size r=10"):
        model.enqueue(torch.zeros(11, 4))


def test_queue_starts_normalised_and_shapes():
    model = tiny_model(queue_size=12, dim=8)
    assert model.queue.shape == (12, 8)
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(12))
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    x = torch.randn(3, 3, 16, 16)
    q, k = model(x, x)
    assert q.shape == (3, 8) and k is not None and k.shape == (3, 8)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3))
    model.eval()
    torch.testing.assert_close(model.embed(x), F.normalize(model.encoder_k(x), dim=1))


@pytest.mark.parametrize(
    ("spec", "img", "features"),
    [
        (BackboneSpec("resnet18", small_stem=True), 16, 512),
        (BackboneSpec("resnet34"), 32, 512),
        (BackboneSpec("resnet50"), 32, 2048),
        (BackboneSpec("vit_tiny", img_size=32, patch_size=8), 32, 192),
        (BackboneSpec("vit_small", img_size=16, patch_size=8), 16, 384),
        (BackboneSpec("vit_base", img_size=16, patch_size=8), 16, 768),
    ],
)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_every_backbone_embeds_to_configured_size(spec, img, features, head):
    model = PCLModel(spec, dim=24, head=head, queue_size=8, mlp_hidden_dim=64)
    assert model.num_features == features
    model.eval()
    z = model.embed(torch.randn(2, 3, img, img))
    assert z.shape == (2, 24)
    assert torch.isfinite(z).all()


def test_small_stem_and_torchvision_key_names():
    net, _ = build_backbone(BackboneSpec("resnet18", small_stem=True))
    assert isinstance(net, torchvision.models.ResNet)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    plain = torchvision.models.resnet18()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(net.state_dict(), strict=True)


def test_unknown_backbone_and_head():
    with pytest.raises(ValueError, match=r"backbone='resnet7' is unknown.*resnet18"):
        build_backbone(BackboneSpec("resnet7"))
    with pytest.raises(ValueError, match="projection head"):
        PCLModel(BackboneSpec("resnet18"), head="deep")  # type: ignore[arg-type]
