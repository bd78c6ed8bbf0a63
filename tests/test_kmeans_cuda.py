"""The fused CUDA assignment kernel (Triton) against the chunked product; skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from pcl_scale.core.kmeans import assign, kmeans


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "tf32"])
@pytest.mark.parametrize(
    "n, k, d", [(20_000, 1_000, 128), (5_003, 517, 96), (4_099, 4_099, 16), (3_001, 257, 8)]
)
def test_fused_cuda_assignment_matches_the_chunked_product(n, k, d, precision, monkeypatch):
    import pcl_scale.core.kmeans as km

    if not km.fused_assign_available():
        pytest.skip("needs Triton")
    from pcl_scale.core import kmeans_triton

    monkeypatch.setattr(kmeans_triton, "PRECISION", precision)
    g = torch.Generator().manual_seed(n)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).cuda()
    c = F.normalize(torch.randn(k, d, generator=g), dim=1).cuda()
    fused_a, fused_d = assign(x, c)
    monkeypatch.setattr(km, "USE_FUSED_ASSIGN", False)
    plain_a, plain_d = assign(x, c)
    exact_d = (x - c[fused_a]).pow(2).sum(1)
    assert torch.allclose(fused_d, exact_d, atol=1e-5)  # the distance is exact for its pick
    # products of 10-bit mantissas (float16 or TF32 inputs) may flip a near-tie; the pick is then
    # no worse than the best by more than that rounding, and nearly every row agrees
    assert float((fused_a == plain_a).float().mean()) > 0.995
    assert float((fused_d - plain_d).max()) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_on_cuda_matches_the_chunked_objective(monkeypatch):
    import pcl_scale.core.kmeans as km

    if not km.fused_assign_available():
        pytest.skip("needs Triton")
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50_000, 128, generator=g), dim=1).cuda()
    fused = kmeans(x, 500, niter=10, seed=0)
    monkeypatch.setattr(km, "USE_FUSED_ASSIGN", False)
    plain = kmeans(x, 500, niter=10, seed=0)
    objective = [float(r.distances.sum()) for r in (fused, plain)]
    assert abs(objective[0] - objective[1]) / objective[1] < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_assignment_past_two_to_the_31_elements(monkeypatch):
    """17M rows x 128: offsets past 2^31 elements, which int32 addressing would wrap."""
    import pcl_scale.core.kmeans as km

    if not km.fused_assign_available():
        pytest.skip("needs Triton")
    n, d = 2**24 + 2**20, 128  # 2.28e9 elements of x
    g = torch.Generator(device="cuda").manual_seed(0)
    x = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1)
    c = F.normalize(torch.randn(256, d, device="cuda", generator=g), dim=1)
    fused_a, fused_d = assign(x, c)
    tail = slice(n - 200_000, n)  # rows whose offsets are past 2^31
    monkeypatch.setattr(km, "USE_FUSED_ASSIGN", False)
    plain_a, _ = assign(x[tail].contiguous(), c)
    assert float((fused_a[tail] == plain_a).float().mean()) > 0.995
    assert torch.allclose(fused_d[tail], (x[tail] - c[fused_a[tail]]).pow(2).sum(1), atol=1e-5)
