from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent
TMP_GIB_NEEDED = 2.0  # checkpoints of the running tests; passing tests' are deleted as they end


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop with one clear line, not a hundred tmp_path errors, when the temp disk is full."""
    import shutil
    import tempfile

    base = session.config.option.basetemp
    where = Path(base).resolve().parent if base else Path(tempfile.gettempdir())
    free_gib = shutil.disk_usage(where).free / 2**30
    if free_gib < TMP_GIB_NEEDED:
        pytest.exit(
            f"the tests need about {TMP_GIB_NEEDED:g} GiB free in {where} and it has "
            f"{free_gib:.1f} GiB: free space there, or point TMPDIR (or --basetemp) elsewhere",
            returncode=1,
        )


def make_images(n: int, size: int = 8, classes: int = 4, seed: int = 0, mode: str = "RGB"):
    """n small images of ``classes`` distinct patterns (plus noise) and their labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(classes, size, size, 3))
    labels = np.arange(n) % classes
    images = []
    for lab in labels:
        arr = np.clip(patterns[lab] + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(
            np.uint8
        )
        img = Image.fromarray(arr, "RGB")
        images.append(img.convert(mode) if mode != "RGB" else img)
    return images, labels


def make_hf_dataset(n: int = 48, size: int = 8, classes: int = 4, seed: int = 0, mode: str = "RGB"):
    import datasets

    images, labels = make_images(n, size, classes, seed, mode)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def write_tiny_dataset(path: Path) -> Path:
    """A save_to_disk DatasetDict with train (48) and test (16) splits of 8x8 images."""
    import datasets

    datasets.DatasetDict(
        {"train": make_hf_dataset(48, seed=0), "test": make_hf_dataset(16, seed=1)}
    ).save_to_disk(str(path))
    return path


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="module")
def module_tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset, written once for a module whose fixtures outlive one test."""
    return write_tiny_dataset(tmp_path_factory.mktemp("module_data") / "tiny")


def tiny_overrides(data_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long run: ResNet-18 (small stem) on 8x8 images."""
    base = {
        "data.source": str(data_dir),
        "data.split": "train",
        "data.eval_split": "''",
        "data.image_size": 8,
        "data.resize_size": 8,
        "data.num_workers": 0,
        "data.aug": "aug_plus",
        "model.backbone": "resnet18",
        "model.small_stem": "true",
        "model.dim": 16,
        "pcl.r": 4,
        "pcl.queue_size": 32,
        "pcl.num_clusters": "[12,16]",
        "pcl.warmup_epochs": 1,
        "pcl.momentum": 0.9,
        "estep.backend": "torch",
        "estep.nredo": 1,
        "estep.niter": 5,
        "optim.epochs": 3,
        "optim.batch_size": 8,
        "optim.lr": 0.05,
        "optim.schedule": "cosine",
        "run.output_dir": str(out_dir),
        "run.checkpoint_every": 1,
        "run.keep_checkpoints": 2,
        "run.log_every": 1,
        "run.evaluate": "false",
        "run.max_steps_per_epoch": 3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch_commands(
    tmp_path: Path, data_dir: Path, launcher_args, port: int, out_dir: Path, dump: Path, **extra
):
    """One ``accelerate launch`` command line per entry of ``launcher_args`` (train_and_dump.py)."""
    overrides = tiny_overrides(data_dir, out_dir, **{"optim.batch_size": 16, **extra})
    return [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *args,
            "--main_process_port",
            str(port),
            str(ROOT / "tests" / "scripts" / "train_and_dump.py"),
            str(dump),
            *overrides,
        ]
        for args in launcher_args
    ]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch_and_dump(tmp_path, tiny_dataset_dir, launcher_args, port, out_dir=None, **extra):
    """Start the launches, wait for all, and read what each of the 2 ranks dumped."""
    from safetensors.torch import load_file

    dump = tmp_path / "dump"
    cmds = launch_commands(
        tmp_path, tiny_dataset_dir, launcher_args, port, out_dir or tmp_path / "run", dump, **extra
    )
    procs = [
        subprocess.Popen(
            c,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,  # DeepSpeed configs name their JSON relative to the repository root
        )
        for c in cmds
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    histories = [json.loads((dump / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    calls = [json.loads((dump / f"calls_rank{r}.json").read_text()) for r in (0, 1)]
    clusters = [load_file(str(dump / f"clusters_rank{r}.safetensors")) for r in (0, 1)]
    return histories, calls, clusters
