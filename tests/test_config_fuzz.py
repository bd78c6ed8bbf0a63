"""Property: for any config values, the trainer either runs or exits 2 with a clear message."""

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcl_scale.cli import main

from .conftest import make_hf_dataset, tiny_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny"
    datasets.DatasetDict({"train": make_hf_dataset(24)}).save_to_disk(str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


values = st.fixed_dictionaries(
    {
        "optim.batch_size": st.integers(-2, 40),
        "optim.grad_accum": st.integers(0, 3),
        "optim.lr": st.sampled_from(["0.05", "-1", "0", "inf", "nan", "1e3"]),
        "pcl.r": st.integers(-1, 30),
        "pcl.num_clusters": st.sampled_from(["[12,16]", "[1]", "[30]", "[]", "[6]", "[20,8]"]),
        "pcl.momentum": st.sampled_from(["0.9", "1.5", "-0.1", "0"]),
        "pcl.temperature": st.sampled_from(["0.2", "0", "-0.5"]),
        "data.image_size": st.sampled_from(["8", "0", "-4", "12"]),
        "data.image_column": st.sampled_from(["image", "img"]),
        "model.backbone": st.sampled_from(["resnet18", "vit_tiny", "resnet7", "RESNET18"]),
        "model.patch_size": st.sampled_from(["4", "3"]),
        "estep.mode": st.sampled_from(["auto", "gather", "sharded", "rank0"]),
        "optim.schedule": st.sampled_from(["cosine", "step", "linear"]),
        "run.log_every": st.integers(-1, 3),
    }
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=values)
def test_trainer_runs_or_exits_cleanly(values, data_dir, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run")
    extra = {"optim.epochs": 2, "run.max_steps_per_epoch": 1, **values}
    code = main(["train", *tiny_overrides(data_dir, out, **extra)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("pcl-scale: error: ") and "Traceback" not in err
