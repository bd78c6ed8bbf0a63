"""End-to-end training on tiny data: one process in-process, two processes under accelerate."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from pcl_scale.artifacts import read_clusters
from pcl_scale.cli import main
from pcl_scale.config import load_config
from pcl_scale.core.loss import PCLLoss
from pcl_scale.engine.loop import build_model, train

from .conftest import ROOT, launch_and_dump, make_hf_dataset, tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def losses(history, epoch=None):
    return [r["loss"] for r in history if "loss" in r and (epoch is None or r["epoch"] == epoch)]


def test_resume_equals_straight_run(tmp_path, tiny_dataset_dir):
    straight = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a")))
    assert [r["epoch"] for r in straight.history if r.get("event") == "estep"] == [1, 2]
    assert all(math.isfinite(v) for v in losses(straight.history))
    assert all("loss_proto" in r for r in straight.history if "loss" in r and r["epoch"] >= 1)

    # a run that stopped after 2 epochs: its checkpoint directory, without the third epoch
    resumed_dir = tmp_path / "b"
    shutil.copytree(
        tmp_path / "a" / "checkpoints" / "step_000000006",  # end of epoch 2 (3 steps per epoch)
        resumed_dir / "checkpoints" / "step_000000006",
    )
    resumed = train(
        load_config(None, tiny_overrides(tiny_dataset_dir, resumed_dir, **{"run.resume": "auto"}))
    )
    assert resumed.epochs_run == 1
    assert losses(resumed.history) == pytest.approx(losses(straight.history, epoch=2), rel=1e-5)
    assert resumed.clusters is not None and straight.clusters is not None
    for a, b in zip(resumed.clusters.clusterings, straight.clusters.clusterings, strict=True):
        assert torch.equal(a.assignments, b.assignments)
        torch.testing.assert_close(a.phi, b.phi)


def test_estep_every_two_epochs_reuses_the_prototypes_and_resumes(tmp_path, tiny_dataset_dir):
    """estep.every=2: E-steps at the end of the warm-up and two epochs later; the epoch between
    trains against the earlier prototypes, also when the run resumes there."""
    extra = {"optim.epochs": 4, "estep.every": 2, "run.keep_checkpoints": 4}
    straight = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a", **extra)))
    assert [r["epoch"] for r in straight.history if r.get("event") == "estep"] == [1, 3]
    assert all("loss_proto" in r for r in straight.history if "loss" in r and r["epoch"] >= 1)

    resumed_dir = tmp_path / "b"  # stopped after epoch 1 (its E-step saved), resumed at epoch 2
    shutil.copytree(
        tmp_path / "a" / "checkpoints" / "step_000000006",
        resumed_dir / "checkpoints" / "step_000000006",
    )
    resumed = train(
        load_config(None, tiny_overrides(tiny_dataset_dir, resumed_dir,
                                         **extra, **{"run.resume": "auto"}))
    )  # fmt: skip
    assert [r["epoch"] for r in resumed.history if r.get("event") == "estep"] == [3]
    assert losses(resumed.history) == pytest.approx(
        losses(straight.history, 2) + losses(straight.history, 3), rel=1e-5
    )


def test_checkpoints_are_complete_and_pruned(tmp_path, tiny_dataset_dir):
    out = tmp_path / "run"
    extra = {"run.keep_checkpoints": 2, "run.mixed_precision": "bf16"}  # bf16 autocast on CPU
    result = train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)))
    assert all(math.isfinite(v) for v in losses(result.history))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_000000006", "step_000000009"]
    last = out / "checkpoints" / "step_000000009"
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 3
    assert [p.name for p in sorted(last.glob("clusters-*"))] == [
        "clusters-00000-of-00001.safetensors"
    ]
    clusters = read_clusters(last)
    assert clusters is not None and [c.num_prototypes for c in clusters.clusterings] == [12, 16]
    assert result.clusters is not None
    saved, final = clusters.clusterings[1], result.clusters.clusterings[1]
    assert torch.equal(saved.assignments, final.assignments)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records[:2]] == ["precision", "queue_fill"]
    assert {"loss", "loss_inst", "acc_inst", "lr", "queue_mean_cos"} <= set(records[2])
    assert (out / "config.yaml").is_file()


def test_export_loads_into_plain_torchvision_with_same_embeddings(
    tmp_path, tiny_dataset_dir, monkeypatch
):
    real_loss = PCLLoss.__call__
    seeds = []  # the seed of every micro-batch's negative-prototype generator

    def recording_loss(self, *args, generator):
        seeds.append(generator.initial_seed())
        return real_loss(self, *args, generator=generator)

    monkeypatch.setattr(PCLLoss, "__call__", recording_loss)
    out = tmp_path / "run"
    extra = {
        "optim.epochs": 2,
        "optim.batch_size": 16,
        "optim.grad_accum": 2,
        "run.evaluate": "true",
        "data.eval_split": "test",
    }
    cfg = load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra))
    result = train(cfg)
    assert result.evaluation is not None and set(result.evaluation) == {
        "raw pixels",
        "pcl backbone",
    }
    steps = [r["step"] for r in result.history if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 optimizer steps of 2 micro-batches per epoch
    assert len(seeds) == 12 and len(set(seeds)) == 12  # no two micro-batches share a draw
    assert result.export_dir == out / "export"
    plain = torchvision.models.resnet18()
    plain.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = nn.Identity()
    plain.fc = nn.Identity()
    plain.load_state_dict(load_file(str(out / "export" / "model.safetensors")), strict=True)

    trained = build_model(cfg)  # the final resume checkpoint holds the trained model
    state = load_file(str(out / "checkpoints" / "step_000000006" / "model.safetensors"))
    trained.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 8, 8)
    plain.eval()
    trained.eval()
    torch.testing.assert_close(plain(x), trained.encoder_q.backbone(x))
    own = json.loads((out / "export" / "pcl_config.json").read_text())
    assert own["loader"] == {
        "timm": False,
        "torchvision": {"architecture": "resnet18", "small_stem": True, "fc": "Identity"},
    }

    # eval/knn.py reads the export alone and reports learned and raw features
    spec = importlib.util.spec_from_file_location("eval_knn", ROOT / "eval" / "knn.py")
    assert spec is not None and spec.loader is not None
    eval_knn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_knn)
    report_file = tmp_path / "report.json"
    code = eval_knn.main(
        [str(out / "export"), f"data.source={tiny_dataset_dir}", f"eval.json={report_file}"]
    )
    report = json.loads(report_file.read_text())
    assert code == 0 and set(report) == {"raw pixels", "pcl backbone"}
    for name, row in report.items():  # the export alone reproduces the run's own evaluation
        assert row == pytest.approx(result.evaluation[name], abs=1e-6)
    assert all(0 <= row["knn_top1"] <= 100 and -1 <= row["ami"] <= 1 for row in report.values())
    assert "model.load_state_dict" in (out / "export" / "README.md").read_text()


def test_vit_backbone_trains_through_the_e_step(tmp_path, tiny_dataset_dir):
    extra = {
        "model.backbone": "vit_tiny",
        "model.patch_size": 4,
        "optim.epochs": 2,
        "run.max_steps_per_epoch": 2,
    }
    result = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "vit", **extra)))
    assert [r["epoch"] for r in result.history if r.get("event") == "estep"] == [1]
    assert all(math.isfinite(v) for v in losses(result.history))
    config = json.loads((tmp_path / "vit" / "export" / "config.json").read_text())
    assert config["model_args"] == {"img_size": 8, "patch_size": 4}


def run_cli(tmp_path, data_dir, capsys, **extra):
    out = tmp_path / "out"
    code = main(["train", *tiny_overrides(data_dir, out, **extra)])
    return code, capsys.readouterr().err, out


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path, tiny_dataset_dir, capsys):
    cases: list[tuple[dict, str]] = [
        ({"data.source": str(tmp_path / "missing")}, "does not exist"),
        ({"data.label_column": "target"}, "available columns: image, label"),
        ({"pcl.num_clusters": "[12,100]"}, "more clusters than the 48 training samples"),
        ({"pcl.r": 20}, "lower pcl.r to at most 4"),
        ({"optim.batch_size": 9, "optim.grad_accum": 2}, "not divisible"),
    ]
    for extra, message in cases:
        code, err, out = run_cli(tmp_path, tiny_dataset_dir, capsys, **extra)
        assert code == 2, extra
        assert message in err and "Traceback" not in err, err
        assert not out.exists(), f"{extra} left {list(out.iterdir())}"

    empty = tmp_path / "empty.parquet"
    make_hf_dataset(4).select([]).to_parquet(str(empty))
    code, err, _ = run_cli(tmp_path, tiny_dataset_dir, capsys, **{"data.source": str(empty)})
    assert code == 2 and "is empty" in err


def corrupt_dataset(tmp_path, bad_indices):
    import datasets

    ds = make_hf_dataset(48)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    for i in bad_indices:
        rows["image"][i] = {"bytes": b"\x89PNG broken", "path": None}
    path = tmp_path / "bad"
    datasets.Dataset.from_dict(rows, features=ds.features).save_to_disk(str(path))
    return path


def test_corrupt_image_stops_training_with_its_index(tmp_path, capsys):
    bad = corrupt_dataset(tmp_path, [7])
    code, err, out = run_cli(tmp_path, bad, capsys, **{"run.max_steps_per_epoch": 0})
    assert code == 2 and "dataset index 7" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()


def test_corrupt_images_skipped_and_counted_when_asked(tmp_path):
    bad = corrupt_dataset(tmp_path, [3, 30])
    extra = {"data.on_bad_image": "skip", "optim.epochs": 2}
    with pytest.warns(UserWarning, match=r"skipping 2 of 48 images .* \[3, 30\]"):
        result = train(load_config(None, tiny_overrides(bad, tmp_path / "run", **extra)))
    assert result.clusters is not None
    assert result.clusters.clusterings[0].assignments.shape == (46,)


def test_mixed_modes_and_sizes_train(tmp_path):
    import datasets

    images = [
        make_hf_dataset(1, size=s, mode=m, seed=i)[0]["image"]
        for i, (s, m) in enumerate([(8, "RGB"), (12, "L"), (10, "RGBA"), (16, "P")] * 6)
    ]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 4 for i in range(24)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "mixed"))
    extra = {"optim.epochs": 2, "pcl.num_clusters": "[14]"}
    result = train(load_config(None, tiny_overrides(tmp_path / "mixed", tmp_path / "run", **extra)))
    assert all(math.isfinite(v) for v in losses(result.history))


def assert_identical(c0, c1):
    assert c0.keys() == c1.keys() and len(c0) == 6
    for key in c0:
        assert torch.equal(c0[key], c1[key]), key


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["gather", "sharded"])
def test_two_processes_train_end_to_end_with_identical_clusters(tmp_path, tiny_dataset_dir, mode):
    config = str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")
    histories, calls, clusters = launch_and_dump(
        tmp_path, tiny_dataset_dir, [["--config_file", config]], 29533, **{"estep.mode": mode}
    )
    estep_records = [r for r in histories[0] if r.get("event") == "estep"]
    assert [r["epoch"] for r in estep_records] == [1, 2]
    assert {r["mode"] for r in estep_records} == {mode}
    assert all(math.isfinite(v) for v in losses(histories[0]))
    assert losses(histories[0]) == losses(histories[1])  # logged means are reduced over ranks
    assert_identical(*clusters)
    if mode == "gather":  # two E-steps, clustered on rank 0 only
        assert [c["cluster_features"] for c in calls] == [2, 0]
    else:
        assert [c["cluster_sharded"] for c in calls] == [2, 2]
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


@pytest.mark.dist
def test_two_nodes_cluster_once_on_global_rank_0(tmp_path, tiny_dataset_dir):
    """Two `accelerate launch` invocations, 2 machines of 1 process each, on 127.0.0.1."""
    common = [
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
    ]
    histories, calls, clusters = launch_and_dump(
        tmp_path,
        tiny_dataset_dir,
        [[*common, "--machine_rank", "0"], [*common, "--machine_rank", "1"]],
        29544,
        **{"estep.mode": "gather"},
    )
    # each node's local rank 0 is a "local main process"; only global rank 0 clusters
    assert [c["cluster_features"] for c in calls] == [2, 0]
    assert_identical(*clusters)
    assert losses(histories[0]) == losses(histories[1])


@pytest.mark.parametrize("aug", ["aug", "aug_plus"])
def test_device_photometric_trains_and_is_seeded(tmp_path, tiny_dataset_dir, aug):
    """data.photometric=device: workers crop and flip only; the run is reproducible."""
    extra = {"data.photometric": "device", "data.aug": aug, "optim.epochs": 2}
    runs = [
        train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / name, **extra)))
        for name in ("a", "b")
    ]
    assert all(math.isfinite(v) for v in losses(runs[0].history))
    assert losses(runs[0].history) == losses(runs[1].history)
    pil = {**extra, "data.photometric": "workers"}
    workers_side = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "c", **pil)))
    assert losses(workers_side.history) != losses(runs[0].history)


@pytest.mark.parametrize("option", ["run.channels_last", "run.compile"])
def test_step_options_give_the_eager_losses(tmp_path, tiny_dataset_dir, option):
    """channels-last and torch.compile change how the step runs, not what it computes (InfoNCE
    steps only: a k-means between them would amplify float rounding into other assignments)."""
    extra = {"optim.epochs": 2, "run.max_steps_per_epoch": 2, "pcl.warmup_epochs": 2}
    runs = [
        train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / value,
                                               **{**extra, option: value})))
        for value in ("false", "true")
    ]  # fmt: skip
    eager, fast = losses(runs[0].history), losses(runs[1].history)
    assert len(eager) == 4 and fast == pytest.approx(eager, rel=1e-3, abs=1e-4)


def test_worker_count_does_not_change_the_run(tmp_path, tiny_dataset_dir):
    """Augmentations seeded per (epoch, index): 0 and 2 workers train the same losses."""
    extra = {"optim.epochs": 2, "run.max_steps_per_epoch": 2}
    runs = [
        train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / str(w),
                                               **{**extra, "data.num_workers": w})))
        for w in (0, 2)
    ]  # fmt: skip
    assert losses(runs[0].history) == losses(runs[1].history)
