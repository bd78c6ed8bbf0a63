"""DeepSpeed ZeRO-1/2/3 on 2 CPU processes against DDP: trajectory, EMA, precision, checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pcl_scale.artifacts import STATE_FILE, load_exported_backbone, read_initial_weights
from pcl_scale.cli import main
from pcl_scale.config import ConfigError, load_config
from pcl_scale.engine.checkpoint import Layout, load_checkpoint
from pcl_scale.engine.runtime import check_deepspeed_config
from pcl_scale.errors import UserError

from .conftest import ROOT, launch_and_dump, launch_env, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def accel_config(name: str) -> list[str]:
    return ["--config_file", str(ROOT / "accelerate_configs" / f"{name}.yaml")]


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, module_tiny_dataset_dir):
    """The same 3-epoch run (9 steps, two E-steps) under DDP, ZeRO-2 and ZeRO-3."""
    runs = {}
    names = ("cpu_2proc", "cpu_2proc_zero2", "cpu_2proc_zero3")
    for port, name in zip((29541, 29542, 29543), names, strict=True):
        tmp = tmp_path_factory.mktemp(name)
        histories, _, clusters = launch_and_dump(
            tmp, module_tiny_dataset_dir, [accel_config(name)], port, **{"run.keep_checkpoints": 3}
        )
        runs[name] = (tmp, histories, clusters)
    return runs


def test_zero2_and_zero3_reproduce_the_ddp_trajectory(fp32_runs):
    ddp = losses(fp32_runs["cpu_2proc"][1][0])
    assert len(ddp) == 9
    for name in ("cpu_2proc_zero2", "cpu_2proc_zero3"):
        _, histories, clusters = fp32_runs[name]
        assert losses(histories[0]) == pytest.approx(ddp, abs=1e-4), name
        assert losses(histories[0]) == losses(histories[1])
        # E-steps agree with DDP's (the running BatchNorm statistics are rank 0's everywhere)
        for key, value in fp32_runs["cpu_2proc"][2][0].items():
            if key.endswith("assignments"):
                assert torch.equal(clusters[0][key], value), (name, key)
            assert torch.equal(clusters[0][key], clusters[1][key]), (name, key)


def test_zero3_export_is_the_consolidated_weights_and_loads_into_torchvision(fp32_runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tmp = fp32_runs["cpu_2proc_zero3"][0]
    export = tmp / "run" / "export"
    weights = load_file(str(export / "model.safetensors"))
    last = tmp / "run" / "checkpoints" / "step_000000009"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(last), tag="pytorch_model")
    prefix = "encoder_q.backbone."
    backbone = {k[len(prefix) :]: v for k, v in consolidated.items() if k.startswith(prefix)}
    assert backbone.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, backbone[key].float()), key
    ddp_export = fp32_runs["cpu_2proc"][0] / "run" / "export" / "model.safetensors"
    ddp = load_file(str(ddp_export))
    assert ddp.keys() == weights.keys()  # same keys as the DDP export
    initial = read_initial_weights(str(last))  # model.init_from=CHECKPOINT on any layout
    assert initial.backbone.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, initial.backbone[key]), key
    assert initial.head is not None
    model, config = load_exported_backbone(export)  # plain torchvision, strict keys
    assert config["loader"]["torchvision"]["small_stem"] is True
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 512)


def test_resume_from_a_zero3_checkpoint_continues_the_trajectory(
    fp32_runs, module_tiny_dataset_dir, tmp_path
):
    src, histories, _ = fp32_runs["cpu_2proc_zero3"]
    step6 = src / "run" / "checkpoints" / "step_000000006"
    assert (step6 / "pytorch_model").is_dir()  # DeepSpeed's own sharded checkpoint
    recorded = json.loads((step6 / STATE_FILE).read_text())
    assert recorded["layout"] == {"kind": "zero3", "world_size": 2}
    assert any(name.startswith("pytorch_model/") for name in recorded["files"])
    out = tmp_path / "resumed"
    shutil.copytree(step6, out / "checkpoints" / step6.name)
    resumed, _, _ = launch_and_dump(
        tmp_path,
        module_tiny_dataset_dir,
        [accel_config("cpu_2proc_zero3")],
        29544,
        out_dir=out,
        **{"run.resume": "auto"},
    )
    straight = {r["step"]: r["loss"] for r in histories[0] if "loss" in r}
    assert {r["step"]: r["loss"] for r in resumed[0] if "loss" in r} == pytest.approx(
        {s: v for s, v in straight.items() if s > 6}, abs=1e-5
    )


@pytest.mark.parametrize(
    "name, extra, port",
    [
        ("cpu_2proc_zero2", {}, 29545),
        ("cpu_2proc_zero3", {}, 29546),
        ("cpu_2proc_zero3", {"model.backbone": "vit_tiny", "model.patch_size": 4}, 29547),
        ("cpu_2proc_zero2", {"model.backbone": "resnet50"}, 29548),
        ("cpu_2proc_zero3", {"model.backbone": "vit_small", "model.patch_size": 4}, 29549),
    ],
    ids=["zero2-resnet18", "zero3-resnet18", "zero3-vit_tiny", "zero2-resnet50", "zero3-vit_small"],
)
def test_bf16_trains_under_zero(name, extra, port, module_tiny_dataset_dir, tmp_path):
    histories, _, clusters = launch_and_dump(
        tmp_path,
        module_tiny_dataset_dir,
        [accel_config(name)],
        port,
        **{"run.mixed_precision": "bf16", "optim.epochs": 2, **extra},
    )
    values = losses(histories[0])
    assert len(values) == 6 and all(torch.isfinite(torch.tensor(values)))
    assert any(r.get("event") == "estep" for r in histories[0])
    assert clusters[0].keys() == clusters[1].keys()
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "name, port",
    [
        ("cpu_2proc", 29551),
        ("cpu_2proc_zero1", 29552),
        ("cpu_2proc_zero2", 29553),
        ("cpu_2proc_zero3", 29554),
        ("cpu_2proc_zero3", 29555),  # twice: ZeRO-3 processes must also exit cleanly every time
    ],
)
def test_momentum_update_is_exact(name, port, tmp_path):
    out = tmp_path / "ema.json"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accel_config(name),
        "--main_process_port",
        str(port),
        str(ROOT / "tests" / "scripts" / "ema_check.py"),
        str(out),
    ]
    proc = subprocess.run(
        cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["moved"] > 1e-3  # the online encoder took a step away from the momentum one
    assert result["err_m0"] == 0.0  # m = 0 copies the online encoder exactly
    assert result["err_m099"] < 1e-6  # m = 0.99 matches the reference on full parameters
    if name.endswith("zero3"):
        assert result["partitioned"] > 0  # the update really ran on partitions


def _tiny_cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path / "data", tmp_path / "run", **extra))


@pytest.mark.parametrize(
    "ds, match",
    [
        ({"optimizer": {"type": "AdamW"}}, r"defines a 'optimizer' \(AdamW\).*remove"),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler'.*optim.schedule"),
        ({"train_micro_batch_size_per_gpu": 3}, r"train_micro_batch_size_per_gpu=3 .* need 4"),
        ({"gradient_accumulation_steps": 2}, r"gradient_accumulation_steps=2 .* need 1"),
        ({"bf16": {"enabled": True}}, r"enables \"bf16\".*run.mixed_precision=bf16"),
        ({"fp16": {"enabled": True}}, r"enables \"fp16\" but run.mixed_precision='no'"),
    ],
)
def test_contradictory_deepspeed_config_is_refused(ds, match, tmp_path):
    cfg = _tiny_cfg(tmp_path)  # batch 8 on 2 processes: 4 per process
    with pytest.raises(ConfigError, match=match):
        check_deepspeed_config({"zero_optimization": {"stage": 2}, **ds}, cfg, 2)
    for shipped in sorted((ROOT / "ds_configs").glob("*.json")):  # every shipped config passes
        check_deepspeed_config(json.loads(shipped.read_text()), cfg, 2)


def test_cli_refuses_a_deepspeed_optimizer_without_writing(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "ds.json"
    shipped = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    bad.write_text(json.dumps({**shipped, "optimizer": {"type": "Adam", "params": {}}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(bad))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    args = tiny_overrides(tmp_path / "data", tmp_path / "run")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "defines a 'optimizer' (Adam)" in err and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_zero_checkpoint_on_another_layout_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_000000003"
    ckpt.mkdir(parents=True)
    state = {"epoch": 1, "global_step": 3, "layout": {"kind": "zero3", "world_size": 2}}
    (ckpt / STATE_FILE).write_text(json.dumps({**state, "files": {}}))
    with pytest.raises(UserError, match=r"zero3 run on 2 processes; this run is zero3 on 1") as err:
        load_checkpoint(None, ckpt, Layout("zero3", 1))
    assert f"model.init_from={ckpt}" in str(err.value)  # the way to continue it
    with pytest.raises(UserError, match=r"this run is ddp on 2"):
        load_checkpoint(None, ckpt, Layout("ddp", 2))
    assert Layout("ddp", 2).compatible(Layout("ddp", 1))  # DDP state is whole: any world size
