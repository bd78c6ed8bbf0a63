"""Interruptions, divergence and reproducibility on tiny data (1 process)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pcl_scale.cli import EXIT_INTERRUPTED, main
from pcl_scale.config import load_config, save_config
from pcl_scale.engine.loop import train

from .conftest import ROOT, launch_and_dump, launch_commands, launch_env, tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def step_losses(history):
    return {r["step"]: r["loss"] for r in history if "loss" in r}


STEPS = {"run.checkpoint_every_steps": 2, "run.keep_checkpoints": 10}


def test_same_seed_same_trajectory_and_mid_epoch_resume_continues_it(tmp_path, tiny_dataset_dir):
    a = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a", **STEPS)))
    b = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "b", **STEPS)))
    assert step_losses(a.history) == step_losses(b.history)  # bitwise, one process
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == [f"step_{s:09d}" for s in (2, 3, 4, 6, 8, 9)]
    # step 4: 1 step into epoch 1 (warm-up over, E-step result saved); step 8: 2 into epoch 2
    for mid in (4, 8):
        run = tmp_path / f"resume{mid}"
        shutil.copytree(
            tmp_path / "a" / "checkpoints" / f"step_{mid:09d}",
            run / "checkpoints" / f"step_{mid:09d}",
        )
        state = json.loads(
            (run / "checkpoints" / f"step_{mid:09d}" / "trainer_state.json").read_text()
        )
        assert state["step_in_epoch"] == {4: 1, 8: 2}[mid]
        resumed = train(
            load_config(
                None, tiny_overrides(tiny_dataset_dir, run, **{**STEPS, "run.resume": "auto"})
            )
        )
        expected = {s: v for s, v in step_losses(a.history).items() if s > mid}
        assert step_losses(resumed.history) == expected
        # the resumed epoch reused its saved E-step result instead of clustering again
        assert [r["epoch"] for r in resumed.history if r.get("event") == "estep"] == (
            [2] if mid == 4 else []
        )


def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_dataset_dir):
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **STEPS, **{"optim.epochs": 2})))
    newest = out / "checkpoints" / "step_000000006"
    with open(newest / "model.safetensors", "r+b") as fh:  # truncate, as a full disk would
        fh.truncate(100)
    from pcl_scale.artifacts import find_latest

    with pytest.warns(
        UserWarning, match="skipping damaged checkpoint.*model.safetensors has size 100"
    ):
        assert find_latest(out) == out / "checkpoints" / "step_000000004"
    (out / "checkpoints" / ".tmp-step_000000007").mkdir()  # an interrupted write
    with pytest.warns(UserWarning):
        assert find_latest(out) == out / "checkpoints" / "step_000000004"


def test_diverging_loss_stops_without_saving(tmp_path, tiny_dataset_dir, capsys):
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_dataset_dir,
        out,
        **{"optim.lr": 1e30, "optim.schedule": "step", "run.checkpoint_every": 1},
    )
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2 and "became NaN or Inf at step" in err and "Traceback" not in err
    bad_step = int(err.split("at step ")[1].split(":")[0])
    saved = (
        [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")]
        if (out / "checkpoints").exists()
        else []
    )
    assert all(s < bad_step for s in saved)


def test_sigterm_saves_and_resume_finishes_the_same_run(tmp_path, tiny_dataset_dir):
    extra = {"optim.epochs": 4, "run.max_steps_per_epoch": 0, "run.checkpoint_every": 100}
    straight = train(
        load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "straight", **extra))
    )
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"  # the CLI without --config would read configs/digits.yaml
    save_config(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)), recipe)
    cmd = [sys.executable, "-m", "pcl_scale.cli", "train", "--config", str(recipe)]
    # same thread count as this process: float reductions, hence losses, then match bit for bit
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "stopped by signal" in err + _
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("_")[1])
    resumed = train(
        load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra, **{"run.resume": "auto"}))
    )
    expected = {s: v for s, v in step_losses(straight.history).items() if s > stopped_at}
    assert step_losses(resumed.history) == pytest.approx(expected, rel=1e-6)
    assert max(expected) == 24


TWO_PROC = {
    "optim.epochs": 8,
    "run.max_steps_per_epoch": 0,
    "run.checkpoint_every_steps": 1,
    "run.keep_checkpoints": 3,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, module_tiny_dataset_dir):
    config = ["--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]
    tmp = tmp_path_factory.mktemp("straight")
    histories, _, clusters = launch_and_dump(
        tmp, module_tiny_dataset_dir, [config], 29561, **TWO_PROC
    )
    return histories, clusters


@pytest.mark.dist
@pytest.mark.parametrize("sig, port", [(signal.SIGKILL, 29562), (signal.SIGTERM, 29564)])
def test_two_processes_interrupted_then_resumed_match_uninterrupted(
    sig, port, tmp_path, module_tiny_dataset_dir, uninterrupted
):
    """SIGKILL: a scheduler's hard kill; SIGTERM: a preemption notice to every worker."""
    straight, straight_clusters = uninterrupted
    config = ["--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")]
    out = tmp_path / "interrupted"
    (cmd,) = launch_commands(
        tmp_path, module_tiny_dataset_dir, [config], port, out, tmp_path / "x", **TWO_PROC
    )
    proc = subprocess.Popen(
        cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step_00000000[5-9]")):
        time.sleep(0.05)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    # SIGKILL every process of the launch at once (the workers run in their own sessions, so
    # killing the launcher's process group is not enough); SIGTERM goes to the workers, as a
    # scheduler's preemption notice does, and each must checkpoint and stop at the same step
    victims = [proc.pid, *workers] if sig == signal.SIGKILL else workers
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    output, _ = proc.communicate(timeout=120)
    for pid in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=60)
    assert not (out / "export").exists(), "the run finished before it was interrupted"
    if sig == signal.SIGTERM:
        assert "stopped by signal 15" in output, output[-3000:]
        assert "Traceback" not in output.split("stopped by signal")[0]
        saved = sorted((out / "checkpoints").glob("step_*"))
        state = json.loads((saved[-1] / "trainer_state.json").read_text())
        stopped_at = int(output.split("stopped by signal 15 at step ")[1].split(";")[0])
        assert state["global_step"] == stopped_at  # the stop checkpoint, written by both ranks
    resumed, _, resumed_clusters = launch_and_dump(
        tmp_path / "b",
        module_tiny_dataset_dir,
        [config],
        port + 1,
        out_dir=out,
        **{**TWO_PROC, "run.resume": "auto"},
    )
    first = min(step_losses(resumed[0]))
    assert 6 <= first <= 24
    expected = {s: v for s, v in step_losses(straight[0]).items() if s >= first}
    assert step_losses(resumed[0]) == pytest.approx(expected, rel=1e-5)
    for key, value in straight_clusters[0].items():
        assert torch.equal(value, resumed_clusters[0][key]) or torch.allclose(
            value.float(), resumed_clusters[0][key].float(), atol=1e-5
        ), key


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path, monkeypatch):
    """Ranks that list different newest checkpoints (a cached shared filesystem) agree on one."""
    import threading

    import pcl_scale.engine.checkpoint as checkpoint
    from pcl_scale.errors import UserError

    from .fakes import run_ranks

    seen = threading.local()  # what "the filesystem" shows this rank

    def find_latest(run_dir):
        return tmp_path / f"step_00000000{seen.rank}"

    monkeypatch.setattr(checkpoint, "find_latest", find_latest)

    def rank_main(comm):
        seen.rank = comm.rank + 1  # rank 0 sees step 1, rank 1 sees step 2
        return checkpoint.agreed_resume("auto", tmp_path, comm)

    assert run_ranks(2, rank_main) == [tmp_path / "step_000000001"] * 2

    def bad_path(comm):  # rank 0's error is every rank's error, instead of a hang
        with pytest.raises(UserError, match="not a complete"):
            checkpoint.agreed_resume(str(tmp_path / "missing"), tmp_path, comm)
        return True

    assert run_ranks(2, bad_path) == [True, True]


def test_the_collective_timeout_reaches_the_process_group(monkeypatch):
    from datetime import timedelta

    from accelerate.state import AcceleratorState, GradientState

    from pcl_scale.engine.runtime import make_accelerator

    cfg = load_config(None, ["run.collective_timeout_min=7"])
    try:
        accelerator = make_accelerator(cfg)
        assert accelerator.init_handler is not None
        assert accelerator.init_handler.to_kwargs()["timeout"] == timedelta(minutes=7)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def sigterm_at_first_extraction(monkeypatch, owner: type, name: str) -> list[int]:
    """Patch ``owner.name`` (an encoder forward) to send SIGTERM to this process on its first
    call in inference mode (an extraction), as a scheduler's preemption notice would."""
    real = getattr(owner, name)
    sent: list[int] = []

    def forward(self, x):
        if torch.is_inference_mode_enabled() and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x)

    monkeypatch.setattr(owner, name, forward)
    return sent


def test_sigterm_during_the_estep_exits_3_and_the_resume_reproduces_the_run(
    tmp_path, tiny_dataset_dir, monkeypatch
):
    from pcl_scale.cli import main
    from pcl_scale.core.model import PCLModel

    extra = {"optim.epochs": 3, "run.checkpoint_every": 1}
    straight = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a", **extra)))
    out = tmp_path / "b"
    recipe = tmp_path / "recipe.yaml"
    save_config(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)), recipe)
    with monkeypatch.context() as patch:
        sent = sigterm_at_first_extraction(patch, PCLModel, "embed")
        assert main(["train", "--config", str(recipe)]) == EXIT_INTERRUPTED
    assert sent == [1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("event") == "estep" for r in records)  # stopped inside the first one
    resumed = train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra,
                                                     **{"run.resume": "auto"})))  # fmt: skip
    expected = {s: v for s, v in step_losses(straight.history).items() if s > 3}
    assert step_losses(resumed.history) == expected  # bit for bit, E-step included


def test_sigterm_during_the_final_evaluation_exits_3_and_the_resume_evaluates(
    tmp_path, tiny_dataset_dir, monkeypatch
):
    from pcl_scale.cli import main

    extra = {"optim.epochs": 2, "run.evaluate": "true", "data.eval_split": "test"}
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    save_config(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)), recipe)
    with monkeypatch.context() as patch:
        sent = sigterm_at_first_extraction(patch, torch.nn.Flatten, "forward")  # raw pixels
        assert main(["train", "--config", str(recipe)]) == EXIT_INTERRUPTED
    assert sent == [1] and not (out / "export").exists()
    resumed = train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra,
                                                     **{"run.resume": "auto"})))  # fmt: skip
    assert resumed.epochs_run == 0 and resumed.evaluation is not None
    assert (out / "export" / "model.safetensors").is_file()


def test_sigterm_during_the_knn_check_exits_3_and_the_resume_reproduces_the_run(
    tmp_path, tiny_dataset_dir, monkeypatch
):
    import pcl_scale.evaluation.progress as evaluate_module  # the kNN check extracts through it

    extra = {"optim.epochs": 3, "run.knn_every": 1, "data.eval_split": "test"}
    straight = train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "a", **extra)))
    out = tmp_path / "b"
    recipe = tmp_path / "recipe.yaml"
    save_config(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra)), recipe)
    real = evaluate_module.extract_shard
    sent: list[int] = []

    def extract_after_sigterm(*args, **kwargs):  # the notice arrives as the check starts
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "extract_shard", extract_after_sigterm)
        assert main(["train", "--config", str(recipe)]) == EXIT_INTERRUPTED
    assert sent == [1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("event") == "knn" for r in records)  # stopped inside the first check
    assert (out / "checkpoints" / "step_000000003").is_dir()  # the end of epoch 0
    resumed = train(load_config(None, tiny_overrides(tiny_dataset_dir, out, **extra,
                                                     **{"run.resume": "auto"})))  # fmt: skip
    expected = {s: v for s, v in step_losses(straight.history).items() if s > 3}
    assert step_losses(resumed.history) == expected  # bit for bit
    knn = [r for r in resumed.history if r.get("event") == "knn"]
    assert [r["epoch"] for r in knn] == [1, 2]


def test_ranks_agree_on_a_stop_only_every_stop_check_every_steps(
    tmp_path, tiny_dataset_dir, monkeypatch
):
    """The agreement is a blocking all-reduce: 2 per 6-step epoch at stop_check_every=2 (steps
    2 and 4; the epoch's end is a boundary of its own), not one after every step."""
    from pcl_scale.engine.signals import StopRequest

    asked: list[int] = []
    real = StopRequest.agreed

    def counting(self, comm):
        asked.append(1)
        return real(self, comm)

    monkeypatch.setattr(StopRequest, "agreed", counting)
    extra = {"optim.epochs": 1, "run.max_steps_per_epoch": 0, "run.stop_check_every": 2}
    train(load_config(None, tiny_overrides(tiny_dataset_dir, tmp_path / "run", **extra)))
    assert len(asked) == 2
