"""The M-step's order of operations with world > 1 (fake communicator), and the E-step's mode."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from pcl_scale.artifacts import TrainState
from pcl_scale.config import load_config
from pcl_scale.core.model import BackboneSpec, PCLModel
from pcl_scale.data import device_input
from pcl_scale.engine.checkpoint import Layout
from pcl_scale.engine.loop import train
from pcl_scale.engine.mstep import EpochContext, train_step

from .conftest import tiny_overrides
from .fakes import run_ranks


class StubAccelerator:
    """What ``train_step`` asks of an Accelerator, on one CPU process without a wrapper."""

    device = torch.device("cpu")
    num_processes = 1

    def accumulate(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def unwrap_model(self, model):
        return model


def test_loss_sees_the_queue_as_it_was_then_all_ranks_keys_are_enqueued_in_rank_order():
    world, batch = 2, 4
    torch.manual_seed(0)
    base = PCLModel(BackboneSpec("resnet18", small_stem=True), dim=8, queue_size=24)
    base.queue_ptr.fill_(20)  # the enqueue wraps around the end of the queue
    models = [copy.deepcopy(base) for _ in range(world)]  # the same weights and queue everywhere
    cfg = load_config(None, ["pcl.r=2", "pcl.temperature=0.2"])
    g = torch.Generator().manual_seed(1)
    images = [(torch.randn(batch, 3, 8, 8, generator=g), torch.randn(batch, 3, 8, 8, generator=g))
              for _ in range(world)]  # fmt: skip

    def rank_main(comm):
        model = models[comm.rank]
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
        logger: Any = None  # train_step logs nothing
        ctx = EpochContext(cfg, StubAccelerator(), model, optimizer, None, comm, logger,
                           TrainState(), 0, 1, Layout(),
                           device_input(cfg.data, torch.device("cpu")))  # fmt: skip
        seen: dict[str, torch.Tensor] = {}
        real_loss = ctx.loss

        def recording(q, k, queue, index, clusters, *, generator):
            seen.update(queue=queue.clone(), keys=k.detach().clone())
            return real_loss(q, k, queue, index, clusters, generator=generator)

        ctx.loss = recording  # type: ignore[assignment]
        before = model.queue.clone()
        im_q, im_k = images[comm.rank]
        train_step(ctx, im_q, im_k, torch.arange(batch) + comm.rank * batch, micro=0)
        return before, seen["queue"], seen["keys"], model.queue.clone(), int(model.queue_ptr)

    results = run_ranks(world, rank_main)
    keys_in_rank_order = torch.cat([keys for _, _, keys, _, _ in results])  # (W B, D)
    slots = (20 + torch.arange(world * batch)) % 24
    for before, seen_queue, _, after, ptr in results:
        assert torch.equal(seen_queue, before)  # the loss ran on the queue before the enqueue
        expected = before.clone()
        expected[slots] = keys_in_rank_order
        assert torch.equal(after, expected)  # every rank's keys, rank 0's first
        assert ptr == (20 + world * batch) % 24
    assert torch.equal(results[0][3], results[1][3])


def test_estep_embeds_with_the_encoder_in_eval_mode(tiny_dataset_dir, tmp_path, monkeypatch):
    """The E-step reads BatchNorm's running statistics: the key encoder must be in eval mode."""
    modes = []
    real_embed = PCLModel.embed

    def recording(self, x):
        if torch.is_inference_mode_enabled():  # the E-step's extraction (keys run under no_grad)
            modes.append(self.encoder_k.training)
        return real_embed(self, x)

    monkeypatch.setattr(PCLModel, "embed", recording)
    train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "run")))
    assert modes and not any(modes), modes  # two E-steps (epochs 1 and 2), every batch in eval


def test_phase_logs_how_long_rank_0_worked_alone():
    import time

    from pcl_scale.engine.tracking import phase

    from .fakes import run_ranks

    class Records:
        def __init__(self) -> None:
            self.records: list[dict] = []

        def log(self, record, step):
            self.records.append(record)

    def rank_main(comm):
        logger = Records()
        with phase(logger, comm, "checkpoint", 7):  # type: ignore[arg-type]
            if comm.is_main:
                time.sleep(0.3)  # work only rank 0 does while the others wait
        return logger.records[0]

    rank0, rank1 = run_ranks(2, rank_main)
    for record in (rank0, rank1):  # every rank logs the same rank-0-alone figure
        assert record["event"] == "phase" and record["phase"] == "checkpoint"
        assert 0.25 <= record["rank0_alone_s"] == rank0["rank0_alone_s"]
    assert rank0["seconds"] >= 0.3 > rank1["seconds"]


def test_a_run_logs_every_waiting_phase(tiny_dataset_dir, tmp_path):
    import json

    extra = {"run.evaluate": "true", "data.eval_split": "test", "run.knn_every": 2}
    train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "run", **extra)))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    phases = [r["phase"] for r in map(json.loads, lines) if r.get("event") == "phase"]
    assert phases.count("estep") == 2 and phases.count("checkpoint") == 3
    assert {"knn", "evaluation", "export"} <= set(phases)
    assert all(r["rank0_alone_s"] == 0.0 for r in map(json.loads, lines) if "rank0_alone_s" in r)
