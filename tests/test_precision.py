"""One source of truth for precision: run.mixed_precision against the launcher's.

``accelerate launch`` exports its config file's ``mixed_precision`` (or ``--mixed_precision``) to
every process as ``ACCELERATE_MIXED_PRECISION``; these tests set that variable as it would.
"""

import json

import pytest
import torch

from pcl_scale.cli import main
from pcl_scale.config import ConfigError, load_config
from pcl_scale.engine.loop import train
from pcl_scale.engine.runtime import (
    autocast_context,
    check_deepspeed_config,
    make_accelerator,
    resolve_precision,
)

from .conftest import tiny_overrides

LAUNCHER = "ACCELERATE_MIXED_PRECISION"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    # before too: an Accelerator left by an earlier test fixes the precision it was made with
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _cfg(tmp_path, precision=None):
    overrides = [f"run.output_dir={tmp_path / 'run'}"]
    if precision is not None:
        overrides.append(f"run.mixed_precision={precision}")
    return load_config(None, overrides)


def test_launcher_bf16_is_used_when_the_run_leaves_precision_unset(tmp_path, monkeypatch, capsys):
    """The defect: gpu_1.yaml's `mixed_precision: bf16` was overridden by run's default 'no'."""
    monkeypatch.setenv(LAUNCHER, "bf16")
    accelerator = make_accelerator(_cfg(tmp_path))
    assert accelerator.mixed_precision == "bf16"
    out = capsys.readouterr().out
    assert "precision: bf16" in out and f"{LAUNCHER}=bf16" in out


@pytest.mark.parametrize(
    ("launcher", "run", "chosen", "reason"),
    [
        (None, "auto", "no", "no launcher precision"),
        ("no", "auto", "no", f"{LAUNCHER}=no"),
        ("bf16", "auto", "bf16", f"{LAUNCHER}=bf16"),
        ("BF16", "auto", "bf16", f"{LAUNCHER}=bf16"),
        (None, "bf16", "bf16", "run.mixed_precision=bf16"),
        # accelerate exports 'no' also when its config says nothing: an explicit run value stands
        ("no", "bf16", "bf16", "run.mixed_precision=bf16"),
        ("bf16", "bf16", "bf16", "run.mixed_precision=bf16"),
        ("no", "no", "no", "run.mixed_precision=no"),
    ],
)
def test_the_chosen_precision_and_its_reason(launcher, run, chosen, reason, tmp_path, monkeypatch):
    if launcher is None:
        monkeypatch.delenv(LAUNCHER, raising=False)
    else:
        monkeypatch.setenv(LAUNCHER, launcher)
    precision = resolve_precision(_cfg(tmp_path, run))
    assert precision.value == chosen
    assert reason in precision.reason


@pytest.mark.parametrize(
    ("launcher", "run", "match"),
    [
        ("bf16", "no", r"run.mixed_precision='no'.*'bf16'.*run.mixed_precision=auto"),
        ("fp16", "bf16", r"run.mixed_precision='bf16'.*'fp16'"),
        ("fp8", "auto", r"'fp8'.*pcl-scale runs no, bf16 or fp16"),
        (None, "fp32", r"run.mixed_precision='fp32' is not one of auto, no, bf16, fp16"),
    ],
)
def test_contradictions_are_errors_naming_both_values(launcher, run, match, tmp_path, monkeypatch):
    if launcher is None:
        monkeypatch.delenv(LAUNCHER, raising=False)
    else:
        monkeypatch.setenv(LAUNCHER, launcher)
    with pytest.raises(ConfigError, match=match):
        resolve_precision(_cfg(tmp_path, run))


def test_cli_exits_2_on_a_contradiction_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LAUNCHER, "bf16")
    out = tmp_path / "run"
    missing = tmp_path / "missing"  # the old code fails here instead, without training
    args = ["run.mixed_precision=no", f"data.source={missing}", f"run.output_dir={out}"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "run.mixed_precision='no'" in err and f"{LAUNCHER}=bf16" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal of fp16")
def test_launcher_fp16_on_cpu_is_refused_naming_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv(LAUNCHER, "fp16")
    with pytest.raises(ConfigError, match=rf"fp16.*needs a CUDA GPU.*{LAUNCHER}=fp16"):
        make_accelerator(_cfg(tmp_path))


def test_deepspeed_follows_the_launcher_precision_too(tmp_path, monkeypatch):
    """Under DeepSpeed the launcher's bf16 turns on DeepSpeed's torch autocast, and the
    forwards outside the engine autocast the same way."""
    monkeypatch.setenv(LAUNCHER, "bf16")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = _cfg(tmp_path)
    ds = {"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}
    check_deepspeed_config(ds, cfg, 1)  # 'auto' resolved to bf16: no contradiction

    class _Accelerator:
        device = torch.device("cpu")

    with autocast_context(_Accelerator(), cfg)():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_shipped_cpu_recipes_follow_the_launcher(monkeypatch):
    """The CPU recipes leave precision to the launcher: fp32 on their own, bf16 on gpu_1."""
    for name in ("digits", "mnist_10k", "small_images"):
        cfg = load_config(name)
        monkeypatch.delenv(LAUNCHER, raising=False)
        assert resolve_precision(cfg).value == "no"
        monkeypatch.setenv(LAUNCHER, "bf16")
        assert resolve_precision(cfg).value == "bf16"


def test_the_run_record_names_the_precision_that_ran(tiny_dataset_dir, tmp_path, monkeypatch):
    """config.yaml keeps what was asked ('auto'); metrics.jsonl says what ran and why."""
    monkeypatch.delenv(LAUNCHER, raising=False)
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset_dir, out, **{"optim.epochs": 1})
    train(load_config(None, [*overrides, "run.mixed_precision=auto"]))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (chosen,) = [e for e in events if e.get("event") == "precision"]
    assert chosen["precision"] == "no" and "no launcher precision" in chosen["reason"]
