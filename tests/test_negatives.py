import pytest
import torch

from pcl_scale.core.negatives import NegativeSampler


def test_never_returns_a_positive_and_no_duplicates():
    g = torch.Generator().manual_seed(0)
    ks, r = (500, 380, 700), 300
    sampler = NegativeSampler(ks)
    for _ in range(30):
        pos = torch.stack([torch.randint(k, (64,), generator=g) for k in ks])
        neg = sampler(pos, r, g)
        assert neg.shape == (3, r) and neg.dtype == torch.int64
        for m, k in enumerate(ks):
            assert neg[m].unique().numel() == r
            assert not torch.isin(neg[m], pos[m]).any()
            assert int(neg[m].min()) >= 0 and int(neg[m].max()) < k


def test_covers_every_eligible_id_including_the_last():
    g = torch.Generator().manual_seed(1)
    ks, r = (40, 25), 5
    pos = torch.tensor([[0, 3, 39], [0, 3, 7]])
    sampler = NegativeSampler(ks)
    seen = torch.zeros(2, max(ks), dtype=torch.bool)
    for _ in range(300):
        seen.scatter_(1, sampler(pos, r, g), True)
    expected = torch.zeros(2, max(ks), dtype=torch.bool)
    for m, k in enumerate(ks):
        expected[m, :k] = True
    expected.scatter_(1, pos, False)
    assert torch.equal(seen, expected)  # nothing past K of the smaller granularity
    assert seen[0, 38] and seen[1, 24]  # the reference's issue #20: the last id must be drawable


def test_uniform_over_eligible():
    g = torch.Generator().manual_seed(2)
    k, r, draws = 20, 4, 20000
    sampler = NegativeSampler((k,))
    pos = torch.tensor([[5]])
    counts = torch.zeros(k)
    for _ in range(draws):
        counts[sampler(pos, r, g)[0]] += 1
    freq = counts[torch.arange(k) != 5] / draws
    # each of 19 eligible ids is drawn with probability 4/19
    assert torch.allclose(freq, torch.full_like(freq, 4 / 19), atol=0.015)
    assert counts[5] == 0


def test_reproducible_from_seed():
    pos = torch.tensor([[1, 2, 3]])
    sampler = NegativeSampler((1000,))
    a = sampler(pos, 100, torch.Generator().manual_seed(7))
    b = sampler(pos, 100, torch.Generator().manual_seed(7))
    c = sampler(pos, 100, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a.sort().values, c.sort().values)


def test_the_r_eligible_ids_with_the_smallest_seeded_keys():
    ks, r = (32, 27), 15
    pos = torch.tensor([[4, 9, 9, 0, 31], [26, 1, 2, 1, 0]])
    neg = NegativeSampler(ks)(pos, r, torch.Generator().manual_seed(3))
    keys = torch.rand(2, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for m, k in enumerate(ks):  # the plain-Python reference
        eligible = [i for i in range(k) if i not in set(pos[m].tolist())]
        slow = sorted(eligible, key=lambda i: float(keys[m, i]))[:r]
        assert sorted(neg[m].tolist()) == sorted(slow)


def test_too_few_eligible_names_k_r_and_batch():
    pos = torch.arange(8).repeat(2, 1)
    with pytest.raises(ValueError, match=r"r=5.*K=12.*8 samples"):
        NegativeSampler((20, 12))(pos, 5, torch.Generator().manual_seed(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draw_never_waits_for_the_host():
    g = torch.Generator(device="cuda").manual_seed(0)
    ks = (25_000, 50_000, 100_000)
    sampler = NegativeSampler(ks, "cuda")
    pos = torch.stack([torch.randint(k, (256,), device="cuda") for k in ks])
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        neg = sampler(pos, 16_000, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for m in range(3):
        assert neg[m].unique().numel() == 16_000
        assert not torch.isin(neg[m], pos[m]).any()
