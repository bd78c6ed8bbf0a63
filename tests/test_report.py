"""Monitoring during training (kNN events, E-step distributions) and `pcl-scale report`."""

import json

import pytest
from PIL import Image

from pcl_scale.cli import main
from pcl_scale.config import load_config
from pcl_scale.engine.loop import train

from .conftest import tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_monitoring_and_report_with_plots(tmp_path, tiny_dataset_dir, capsys):
    run = tmp_path / "run"
    extra = {"run.knn_every": 1, "run.evaluate": "true", "data.eval_split": "test"}
    train(load_config(None, tiny_overrides(tiny_dataset_dir, run, **extra)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if r.get("event") == "knn"]
    assert [r["epoch"] for r in knn] == [0, 1, 2]
    assert all(0 <= r["knn5_top1"] <= 100 and 0 <= r["knn200_top5"] <= 100 for r in knn)
    estep = [r for r in records if r.get("event") == "estep"][-1]
    for m in (0, 1):
        assert estep[f"k{m}_size_p10"] <= estep[f"k{m}_size_p50"] <= estep[f"k{m}_size_p90"]
        assert estep[f"k{m}_phi_min"] <= estep[f"k{m}_phi_p50"] <= estep[f"k{m}_phi_max"]
    assert (run / "embeddings.safetensors").is_file()

    assert main(["report", str(run)]) == 0
    report = run / "report" / "report.md"
    assert str(report) in capsys.readouterr().out
    text = report.read_text()
    pngs = ["loss.png", "accuracy.png", "lr.png", "knn.png", "cluster_sizes.png", "phi.png",
            "embeddings.png"]  # fmt: skip
    for name in pngs:
        assert f"]({name})" in text, name
        with Image.open(run / "report" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 2  # not blank
    assert "## E-steps" in text and "## Final evaluation" in text


def test_report_of_a_directory_without_metrics_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err
