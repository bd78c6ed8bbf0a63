import pytest
import torch

from pcl_scale.negatives import sample_negative_prototypes


def test_never_returns_a_positive_and_no_duplicates():
    g = torch.Generator().manual_seed(0)
    k, r = 500, 300
    for _ in range(50):
        pos = torch.randint(k, (64,), generator=g)
        neg = sample_negative_prototypes(pos, k, r, g)
        assert neg.shape == (r,)
        assert neg.unique().numel() == r
        assert not torch.isin(neg, pos).any()
        assert int(neg.min()) >= 0 and int(neg.max()) < k


def test_covers_every_eligible_id_including_the_last():
    g = torch.Generator().manual_seed(1)
    k, r = 40, 5
    pos = torch.tensor([0, 3, 7])
    seen = torch.zeros(k, dtype=torch.bool)
    for _ in range(200):
        seen[sample_negative_prototypes(pos, k, r, g)] = True
    expected = torch.ones(k, dtype=torch.bool)
    expected[pos] = False
    assert torch.equal(seen, expected)
    assert seen[k - 1]  # the reference's issue #20: the last prototype must be drawable


def test_uniform_over_eligible():
    g = torch.Generator().manual_seed(2)
    k, r, draws = 20, 4, 20000
    pos = torch.tensor([5])
    counts = torch.zeros(k)
    for _ in range(draws):
        counts[sample_negative_prototypes(pos, k, r, g)] += 1
    freq = counts[torch.arange(k) != 5] / draws
    # each of 19 eligible ids is drawn with probability 4/19
    assert torch.allclose(freq, torch.full_like(freq, 4 / 19), atol=0.015)


def test_reproducible_from_seed():
    pos = torch.tensor([1, 2, 3])
    a = sample_negative_prototypes(pos, 1000, 100, torch.Generator().manual_seed(7))
    b = sample_negative_prototypes(pos, 1000, 100, torch.Generator().manual_seed(7))
    c = sample_negative_prototypes(pos, 1000, 100, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_first_r_eligible_ids_of_the_seeded_permutation():
    pos = torch.tensor([4, 9, 9, 0, 31])
    neg = sample_negative_prototypes(pos, 32, 20, torch.Generator().manual_seed(3))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3)).tolist()
    slow = [i for i in perm if i not in set(pos.tolist())][:20]  # the plain-Python reference
    assert neg.tolist() == slow


def test_too_few_eligible_names_k_r_and_batch():
    pos = torch.arange(8)
    with pytest.raises(ValueError, match=r"r=5.*K=12.*8 samples"):
        sample_negative_prototypes(pos, 12, 5, torch.Generator().manual_seed(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draw_never_waits_for_the_host():
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randint(100_000, (256,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        neg = sample_negative_prototypes(pos, 100_000, 16_000, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert neg.unique().numel() == 16_000
    assert not torch.isin(neg, pos).any()
