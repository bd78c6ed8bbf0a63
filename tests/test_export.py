"""The export as a timm model folder, its model card, `pcl-scale push`, timm backbones and
`model.init_from`."""

import hashlib
import json
import math
import shutil
from typing import Any

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from pcl_scale.artifacts import load_exported_backbone, read_initial_weights
from pcl_scale.cli import main
from pcl_scale.config import load_config
from pcl_scale.core.model import BackboneSpec, PCLModel
from pcl_scale.engine.export import export_backbone, timm_config
from pcl_scale.engine.loop import build_model, train

from .conftest import tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def exported(tmp_path, overrides, spec):
    """A randomly initialised PCL model of ``spec`` exported with the config of ``overrides``."""
    cfg = load_config(None, overrides)
    model = PCLModel(spec, dim=16, queue_size=8).eval()
    export = export_backbone(model, cfg, tmp_path / "run" / "export", {"pcl_backbone/knn": 1.0})
    return model, export


@pytest.mark.parametrize(
    ("overrides", "spec", "size"),
    [
        (["model.backbone=resnet18", "data.image_size=32"], BackboneSpec("resnet18"), 32),
        (
            ["model.backbone=vit_tiny", "model.patch_size=8", "data.image_size=16"],
            BackboneSpec("vit_tiny", img_size=16, patch_size=8),
            16,
        ),
        (["model.backbone=resnet10t", "data.image_size=32"], BackboneSpec("resnet10t"), 32),
    ],
    ids=["torchvision-resnet18", "vit_tiny", "timm-resnet10t"],
)
def test_timm_local_dir_gives_the_trainer_backbone_features(tmp_path, overrides, spec, size):
    model, export = exported(tmp_path, [*overrides, "model.dim=16"], spec)
    plain = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(plain(x), model.encoder_q.backbone(x))
    config = timm.data.resolve_data_config({}, model=plain)  # the eval view, from config.json
    assert tuple(config["input_size"]) == (3, size, size)
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert config["crop_pct"] == pytest.approx(size / round(size * 256 / 224), abs=1e-4)
    loaded, view = load_exported_backbone(export)  # what pcl-scale eval uses
    torch.testing.assert_close(loaded(x), plain(x))
    assert view["image_size"] == size


def test_small_stem_export_says_torchvision_and_loads_there(tmp_path):
    overrides = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=8"]
    model, export = exported(tmp_path, overrides, BackboneSpec("resnet18", small_stem=True))
    own = json.loads((export / "pcl_config.json").read_text())
    assert own["loader"]["timm"] is False and own["loader"]["torchvision"]["small_stem"]
    card = (export / "README.md").read_text()
    assert "timm's ResNet cannot express" in card and "torchvision.models.resnet18()" in card
    loaded, _ = load_exported_backbone(export)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.encoder_q.backbone(x))


def test_model_card_parses_and_carries_the_hub_metadata(tmp_path):
    overrides = ["model.backbone=resnet18", "data.source=someorg/somedata", "run.license=mit"]
    _, export = exported(tmp_path, overrides, BackboneSpec("resnet18"))
    card = ModelCard.load(export / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "timm"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["license"] == "mit"
    assert meta["datasets"] == ["someorg/somedata"]
    assert {"image-feature-extraction", "prototypical-contrastive-learning"} <= set(meta["tags"])
    text = card.text
    assert "| pcl backbone | 1.0000 |" in text  # the evaluation as a markdown table
    assert 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in text
    assert "torchvision.models.resnet18()" in text
    assert "@inproceedings{li2021prototypical" in text


def test_timm_backbone_trains_exports_and_loads_back_through_timm(tmp_path, tiny_dataset_dir):
    extra = {
        "model.backbone": "test_vit",
        "model.small_stem": "false",
        "data.image_size": 16,
        "data.resize_size": 16,
        "optim.epochs": 2,
        "run.max_steps_per_epoch": 2,
    }
    out = tmp_path / "run"
    result = train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)))
    assert [r["epoch"] for r in result.history if r.get("event") == "estep"] == [1]
    assert all(math.isfinite(r["loss"]) for r in result.history if "loss" in r)
    plain = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    trained = build_model(
        result_cfg := load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra))
    )
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    trained.load_state_dict(load_file(str(last / "model.safetensors")), strict=True)
    trained.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(plain(x), trained.encoder_q.backbone(x))
    assert result_cfg.model.backbone == "test_vit"


def test_unknown_backbone_names_close_timm_models(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path}", "model.backbone=resnet10"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone" in err and "resnet10t" in err and "Traceback" not in err


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("blocker", ["offline", "no token"])
def test_push_without_hub_access_exits_2_and_leaves_the_export(tmp_path, monkeypatch, capsys,
                                                               blocker):  # fmt: skip
    from huggingface_hub import constants

    _, export = exported(tmp_path, ["model.backbone=resnet18"], BackboneSpec("resnet18"))
    before = digest(export)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", blocker == "offline")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    assert main(["push", str(export), "me/pcl-digits"]) == 2
    err = capsys.readouterr().err
    expected = "offline mode" if blocker == "offline" else "hf auth login"
    assert expected in err and f"pcl-scale push {export} me/pcl-digits" in err
    assert "Traceback" not in err
    assert digest(export) == before


def test_push_uploads_the_folder_to_a_private_repo(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"]))

    _, export = exported(tmp_path, ["model.backbone=resnet18"], BackboneSpec("resnet18"))
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push", str(export), "me/pcl", "--private"]) == 0
    assert calls == [
        ("create_repo", "me/pcl", {"private": True, "exist_ok": True}),
        ("upload_folder", "me/pcl", str(export)),
    ]
    assert "https://huggingface.co/me/pcl" in capsys.readouterr().out


def test_init_from_an_export_starts_both_encoders_there(tmp_path, tiny_dataset_dir):
    source, export = exported(
        tmp_path, ["model.backbone=resnet18", "model.small_stem=true", "model.dim=16"],
        BackboneSpec("resnet18", small_stem=True),
    )  # fmt: skip
    cfg = load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "b",
                                           **{"model.init_from": str(export)}))  # fmt: skip
    model = build_model(cfg)
    for encoder in (model.encoder_q, model.encoder_k):
        for key, value in source.encoder_q.state_dict().items():
            if "running" not in key and "num_batches" not in key:
                assert torch.equal(encoder.state_dict()[key], value), key


def test_init_from_a_checkpoint_and_a_backbone_file(tmp_path, tiny_dataset_dir):
    first = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a")))
    checkpoint = sorted((tmp_path / "a" / "checkpoints").glob("step_*"))[-1]
    weights = read_initial_weights(str(checkpoint))
    trained = load_file(str(checkpoint / "model.safetensors"))
    assert weights.head is not None
    for key, value in weights.backbone.items():
        assert torch.equal(value, trained[f"encoder_q.backbone.{key}"])
    backbone_file = tmp_path / "backbone.safetensors"
    save_file(weights.backbone, str(backbone_file))
    cfg = load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "c",
                                           **{"model.init_from": str(backbone_file)}))  # fmt: skip
    model = build_model(cfg)
    conv1 = model.encoder_k.backbone.state_dict()["conv1.weight"]
    assert torch.equal(conv1, trained["encoder_q.backbone.conv1.weight"])
    assert first.epochs_run == 3


def fake_hub_cache(cache, repo_id, state):
    """The local Hub cache layout that `hf_hub_download(local_files_only=True)` reads."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))


def test_init_from_timm_pretrained_reads_the_local_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "resnet10t.c3_in1k"
    reference = timm.create_model("resnet10t", num_classes=1000)
    with pytest.raises(Exception, match="not in the local Hub cache"):
        read_initial_weights(f"timm:{name}")
    fake_hub_cache(tmp_path / "hub", "timm/resnet10t.c3_in1k", reference.state_dict())
    weights = read_initial_weights(f"timm:{name}")
    assert "fc.weight" not in weights.backbone  # pooled features: no classifier
    first_conv = reference.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(weights.backbone["conv1.0.weight"], first_conv)
    # pcl-scale eval takes the same name as a baseline (its weights, its eval view)
    model, view = load_exported_backbone(name)
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], first_conv)
    assert view["image_size"] == 176 and view["training_config"]["data"]["resize_size"] == 201


def test_init_from_weights_of_another_architecture_is_refused(tmp_path, tiny_dataset_dir, capsys):
    _, export = exported(tmp_path, ["model.backbone=resnet34"], BackboneSpec("resnet34"))
    code = main(["train", *tiny_overrides(tiny_dataset_dir, tmp_path / "b",
                                          **{"model.init_from": str(export)})])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "do not fit this model" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_a_timm_folder_with_a_classifier_is_scored_on_pooled_features(tmp_path):
    """A downloaded supervised timm folder keeps its classifier in config.json; evaluation must
    read its pooled features, not its logits."""
    net: Any = timm.create_model("test_convnext", num_classes=10).eval()
    timm.models.save_for_hf(net, str(tmp_path / "supervised"), safe_serialization=True)
    loaded, view = load_exported_backbone(tmp_path / "supervised")
    x = torch.randn(2, 3, 32, 32)
    assert loaded(x).shape == (2, net.num_features)
    torch.testing.assert_close(loaded(x), net.forward_head(net.forward_features(x), True))
    assert view["image_size"] == net.pretrained_cfg["input_size"][-1]


def test_exported_crop_pct_gives_timm_the_trainers_resize(tmp_path):
    for size, resize in ((32, 37), (64, 68), (112, 127), (224, 228), (224, 256), (16, 16)):
        cfg = load_config(None, [f"data.image_size={size}", f"data.resize_size={resize}"])
        pct = timm_config(cfg, 512)["pretrained_cfg"]["crop_pct"]
        assert math.floor(size / pct) == resize, (size, resize, pct)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model.backbone=resnet50.a1_in1k"], "model.init_from=timm:resnet50.a1_in1k"),
        (["model.backbone=resnet50.nosuchtag"], "model.init_from=timm:resnet50.nosuchtag"),
        (["model.backbone=gcvit_xxtiny", "data.image_size=28"], "cannot build 'gcvit_xxtiny'"),
        (["--config", "/nonexistent/configs/mnist.yaml"], "is neither a file nor"),
    ],
    ids=["weights-tag", "bad-tag", "size-timm-cannot-build", "missing-configs-file"],
)
def test_backbone_and_recipe_mistakes_exit_2_before_anything_runs(tmp_path, capsys, args,
                                                                  expected):  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", *args, f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_eval_of_a_bad_tag_or_an_incomplete_export_exits_2(tmp_path, capsys):
    assert main(["eval", "resnet50.nosuchtag", "data.source=digits"]) == 2
    assert "neither a folder with a config.json nor a timm model name" in capsys.readouterr().err
    _, export = exported(tmp_path, ["model.backbone=resnet18"], BackboneSpec("resnet18"))
    (export / "model.safetensors").unlink()
    assert main(["eval", str(export), "data.source=digits"]) == 2
    err = capsys.readouterr().err
    assert "holds no model.safetensors" in err and "Traceback" not in err


def test_a_resumed_run_does_not_read_init_from_again(tmp_path, tiny_dataset_dir):
    """The checkpoint holds the weights: a resume needs the init_from source no longer (it may
    have been deleted) and continues the straight run."""
    _, export = exported(
        tmp_path, ["model.backbone=resnet18", "model.small_stem=true", "model.dim=16"],
        BackboneSpec("resnet18", small_stem=True),
    )  # fmt: skip
    start = {"model.init_from": str(export)}
    straight = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a", **start)))
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000000006",
                    resumed_dir / "checkpoints" / "step_000000006")  # fmt: skip
    shutil.rmtree(export)
    resumed = train(load_config(None, tiny_overrides(tiny_dataset_dir, resumed_dir, **start,
                                                     **{"run.resume": "auto"})))  # fmt: skip
    last = [r["loss"] for r in straight.history if "loss" in r and r["epoch"] == 2]
    assert [r["loss"] for r in resumed.history if "loss" in r] == pytest.approx(last, rel=1e-5)
