"""The queue starts full of real keys (pcl.queue_init='keys'), not random vectors."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

from pcl_scale.artifacts import find_latest
from pcl_scale.config import load_config
from pcl_scale.core.model import BackboneSpec, PCLModel
from pcl_scale.data import DeviceInput
from pcl_scale.distributed.comm import Comm
from pcl_scale.engine.keys import fill_queue
from pcl_scale.engine.loop import train

from .conftest import tiny_overrides

CPU_INPUT = DeviceInput(torch.device("cpu"), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class KeyViews(Dataset):
    """Fixed random images, each returned as its own key view with its index."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        _, i = key  # (round over the dataset, index)
        return self.images[i], i


def test_queue_holds_keys_of_every_image_and_the_pointer_is_back_at_zero():
    n, queue_size, batch = 10, 24, 4  # a queue longer than the dataset: the draw repeats it
    cfg = load_config(None, ["data.num_workers=0"])
    model = PCLModel(BackboneSpec("resnet18", small_stem=True), dim=16, queue_size=queue_size)
    model.eval()  # per-image keys, so that each queued row can be matched to its image
    random_queue = model.queue.clone()
    view = KeyViews(n)
    fill_queue(cfg, model, view, Comm(), batch, contextlib.nullcontext, CPU_INPUT)  # type: ignore[arg-type]
    assert int(model.queue_ptr) == 0
    keys = model.embed(view.images)  # (n, D), the slow reference: one forward of all images
    cos = model.queue @ keys.t()  # (queue, n)
    best, which = cos.max(dim=1)
    assert torch.allclose(best, torch.ones(queue_size), atol=1e-5)  # every row is a real key
    assert set(which.tolist()) == set(range(n))  # 24 draws cover all 10 images
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(queue_size), atol=1e-5)
    assert not torch.allclose(model.queue, random_queue)


def test_same_seed_same_queue_other_seed_other_order():
    view = KeyViews(10)

    def filled(seed: int) -> torch.Tensor:
        cfg = load_config(None, ["data.num_workers=0", f"run.seed={seed}"])
        torch.manual_seed(0)
        model = PCLModel(BackboneSpec("resnet18", small_stem=True), dim=16, queue_size=8)
        model.eval()
        fill_queue(cfg, model, view, Comm(), 4, contextlib.nullcontext, CPU_INPUT)  # type: ignore[arg-type]
        return F.normalize(model.queue, dim=1)

    a, b, c = filled(0), filled(0), filled(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("init", ["keys", "random"])
def test_training_logs_the_fill_and_the_queue_mean_cosine(tiny_dataset_dir, tmp_path, init):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset_dir, out, **{"optim.epochs": 1})
    try:
        train(load_config(None, [*overrides, "run.log_every=1", f"pcl.queue_init={init}"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fills = [r for r in records if r.get("event") == "queue_fill"]
    assert len(fills) == (1 if init == "keys" else 0)
    steps = [r for r in records if "loss" in r]
    ckpt = find_latest(out)
    assert ckpt is not None
    queue = load_file(str(ckpt / "model.safetensors"))["queue"].float()
    direct = float((queue @ queue.t()).mean())  # the slow reference: every pair
    assert steps[-1]["queue_mean_cos"] == pytest.approx(direct, abs=1e-5)
