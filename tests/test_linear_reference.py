"""The reference linear protocol, data-parallel: W fake ranks take the one-process steps."""

import pytest
import torch
from torch.utils.data import Dataset

import pcl_scale.evaluation.linear_probe as linear_probe_module
from pcl_scale.distributed.comm import Comm
from pcl_scale.evaluation.linear_probe import GlobalBatchShare, ReferenceSchedule, linear_reference
from tests.fakes import FakeComm, run_ranks

SCHEDULE = ReferenceSchedule(lr=0.5, batch_size=16, epochs=3, milestones=(2,))


class Blobs(Dataset):
    """(3, 4, 4) images around 3 class centres, deterministic by index, with the index."""

    def __init__(self, n: int, offset: int = 0) -> None:
        g = torch.Generator().manual_seed(offset)
        self.labels = torch.arange(n) % 3
        centres = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(99))
        self.images = centres[self.labels] + 0.8 * torch.randn(n, 3, 4, 4, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


def encoder() -> torch.nn.Module:
    """The same encoder on every rank, from a local generator: ranks are threads here, and the
    global RNG is shared between them, so seeding it would race."""
    linear = torch.nn.Linear(48, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / 48**0.5)
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=g) * 0.1)
    return torch.nn.Sequential(torch.nn.Flatten(), linear)


def train_on(comm: Comm, fcs: list[torch.nn.Module]) -> dict[str, object]:
    train, test = Blobs(51), Blobs(20, offset=1)
    return linear_reference(encoder(), train, train.labels, test, test.labels, SCHEDULE,
                            seed=3, comm=comm)  # fmt: skip


@pytest.fixture
def recorded_fcs(monkeypatch):
    """Every fc that linear_reference trains (one per rank)."""
    fcs: list[torch.nn.Module] = []
    real = linear_probe_module._initial_fc

    def recording(*args):
        fc = real(*args)
        fcs.append(fc)
        return fc

    monkeypatch.setattr(linear_probe_module, "_initial_fc", recording)
    return fcs


@pytest.mark.parametrize("world_size", [2, 3])
def test_data_parallel_linear_reference_equals_one_process(recorded_fcs, world_size):
    alone = train_on(Comm(), recorded_fcs)
    (single,) = recorded_fcs
    recorded_fcs.clear()
    results = run_ranks(world_size, lambda comm: train_on(comm, recorded_fcs))
    assert len(recorded_fcs) == world_size
    for fc in recorded_fcs:  # every rank, the one-process weights up to summation order
        torch.testing.assert_close(fc.weight, single.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fc.bias, single.bias, rtol=1e-4, atol=1e-5)
    for res in results:
        assert res["top1_per_epoch"] == alone["top1_per_epoch"]
        assert res["top5"] == alone["top5"]
    assert 50.0 < float(alone["top1"]) <= 100.0  # type: ignore[arg-type]  # separable blobs


def test_the_shares_of_a_global_batch_make_the_one_process_batch():
    def shares(comm: FakeComm) -> list[list[int]]:
        return list(GlobalBatchShare(51, 16, seed=3, epoch=1, comm=comm))

    (alone,) = [list(GlobalBatchShare(51, 16, seed=3, epoch=1, comm=Comm()))]
    per_rank = run_ranks(3, shares)
    assert [len(b) for b in alone] == [16, 16, 16, 3]
    for step, batch in enumerate(alone):
        union = sorted(i for rank in per_rank for i in rank[step])
        assert union == sorted(batch)
    two = run_ranks(2, lambda comm: list(GlobalBatchShare(49, 16, 3, 1, comm)))
    assert all(len(r) == 3 for r in two)  # the last batch (1 image) has no share for rank 1
