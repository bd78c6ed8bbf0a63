"""`pcl-scale eval`: every protocol on a tiny run's export, raw pixels beside, 1 vs 2 processes."""

import io
import json
import subprocess
import sys

import pytest
import torch

from pcl_scale.cli import main
from pcl_scale.config import DataConfig, load_config
from pcl_scale.data import IndexedImages, eval_transform, labels_of, load_split
from pcl_scale.engine.loop import train
from pcl_scale.evaluation.metrics import knn_scores

from .conftest import ROOT, launch_env, make_hf_dataset, tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, module_tiny_dataset_dir):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("eval_run") / "run"
    train(load_config(None, tiny_overrides(module_tiny_dataset_dir, out, **{"optim.epochs": 2})))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def eval_args(run, data, *extra):
    return [
        "eval",
        str(run / "export"),
        f"data.source={data}",
        "data.num_workers=0",
        "eval.lowshot_ks=[1,2,4,32]",
        "eval.lowshot_runs=2",
        *extra,
    ]


def test_every_protocol_for_learned_and_raw_features(tiny_run, module_tiny_dataset_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                *eval_args(tiny_run, module_tiny_dataset_dir),
                f"eval.run_dir={tiny_run}",
                f"eval.json={out}",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report) == {"raw pixels", "pcl backbone", "prototypes"}
    expected = {
        "knn200_top1", "knn200_top5", "knn5_top1", "knn5_top5",
        "linear_top1", "linear_top5", "linear_weight_decay", "linear_val_top1",
        "lowshot_k1_mean", "lowshot_k1_std", "lowshot_k2_mean", "lowshot_k4_mean",
        "kmeans_nmi", "kmeans_ami", "kmeans_ari", "kmeans_acc",
    }  # fmt: skip
    for name in ("raw pixels", "pcl backbone"):
        assert expected <= set(report[name]), name
        assert report[name]["lowshot_skipped_k"] == [32]  # 12 training images per class
        assert 0.0 <= report[name]["knn200_top1"] <= 100.0
    # the run clustered 48 training images at K = 12 and 16 (the tiny recipe)
    # K > 4 classes: purity instead of a one-to-one matched accuracy
    assert {"k0_nmi", "k0_ami", "k0_ari", "k0_purity", "k1_ami"} <= set(report["prototypes"])
    # raw pixels are the eval view flattened: recompute the kNN independently
    data = DataConfig(source=str(module_tiny_dataset_dir), image_size=8, resize_size=8)
    views, labels = [], []
    for split in ("train", "test"):
        ds = load_split(data, split)
        view = IndexedImages(ds, "image", eval_transform(data, as_uint8=False))
        views.append(torch.stack([view[i][0].flatten() for i in range(len(view))]))
        lab = labels_of(ds, data)
        assert lab is not None
        labels.append(lab)
    direct = knn_scores(views[0], labels[0], views[1], labels[1])
    for key, value in direct.items():
        assert report["raw pixels"][key] == pytest.approx(value), key


def test_sharded_over_two_processes_equals_one(tiny_run, module_tiny_dataset_dir, tmp_path):
    args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[knn,cluster]")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    torch.set_num_threads(1)  # as each of the two processes below
    try:
        assert main([*args, f"eval.json={one}"]) == 0
    finally:
        torch.set_num_threads(2)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29571", "-m", "pcl_scale.cli", *args, f"eval.json={two}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a.keys() == b.keys()
    for name in a:
        assert b[name] == pytest.approx(a[name], abs=1e-6), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["eval.protocols=[knn,svm]"], "unknown protocols ['svm']"),
        (["data.label_column=nope"], "'nope'"),
        (["eval.lowshot_ks=[1,x]"], "eval.lowshot_ks"),
        (["eval.lowshot_ks=[0,2]"], "eval.lowshot_ks=[0, 2] must be positive"),
        (["data.max_samples=-1"], "data.max_samples=-1"),
        (["data.eval_split=''"], "needs a query split"),
        (["--protocols", "knn"], "section.key=value"),
    ],
)
def test_bad_eval_input_is_a_clear_error(tiny_run, module_tiny_dataset_dir, extra, message, capsys):
    assert main([*eval_args(tiny_run, module_tiny_dataset_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_max_samples_limits_the_split(tiny_run, module_tiny_dataset_dir, capsys):
    # the run clustered all 48 training images; the first 24 cannot be scored against them
    args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[cluster]")
    assert main([*args, "data.max_samples=24", f"eval.run_dir={tiny_run}"]) == 2
    err = capsys.readouterr().err
    assert "covers 48 images but split 'train' has 24" in err and "Traceback" not in err


def test_eval_of_a_directory_without_export_is_refused(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "data.source=digits"]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_reference_linear_protocol_trains_through_the_images(
    tiny_run, module_tiny_dataset_dir, tmp_path
):
    out = tmp_path / "linear.json"
    args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[linear_reference]")
    assert main([*args, "eval.linear_epochs=3", f"eval.json={out}"]) == 0
    report = json.loads(out.read_text())
    for name in ("raw pixels", "pcl backbone"):
        row = report[name]
        assert len(row["linear_reference_top1_per_epoch"]) == 3
        assert row["linear_reference_top1"] == row["linear_reference_top1_per_epoch"][-1]
        assert 0.0 <= row["linear_reference_top1"] <= row["linear_reference_top5"] <= 100.0


def test_multilabel_targets_get_lowshot_map(tiny_run, tmp_path):
    import datasets

    rng = torch.Generator().manual_seed(0)
    splits = {}
    for split, n in (("train", 40), ("test", 24)):
        base = make_hf_dataset(n, seed=n)
        targets = torch.where(torch.rand(n, 3, generator=rng) < 0.4, 1, -1)
        targets[:4] = 1  # enough positives of every class
        targets[5, 0] = 0  # a difficult one
        splits[split] = datasets.Dataset.from_dict(
            {"image": base["image"], "targets": targets.tolist()},
            features=datasets.Features(
                {"image": datasets.Image(), "targets": datasets.Sequence(datasets.Value("int64"))}
            ),
        )
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "voc"))
    out = tmp_path / "voc.json"
    args = ["data.label_column=targets", "eval.protocols=[knn,lowshot]", f"eval.json={out}"]
    assert main([*eval_args(tiny_run, tmp_path / "voc"), *args]) == 0
    report = json.loads(out.read_text())
    for name in ("raw pixels", "pcl backbone"):
        assert report[name]["skipped_for_multilabel"] == ["knn"]
        assert 0.0 <= report[name]["lowshot_k2_mean"] <= 100.0  # mAP (%)


def test_eval_reads_the_runs_own_config(tiny_run, module_tiny_dataset_dir, tmp_path):
    """`--config RUN_DIR/config.yaml` gives the data settings of the run: the same report."""
    direct, from_run = tmp_path / "direct.json", tmp_path / "from_run.json"
    common = ["data.num_workers=0", "eval.protocols=[knn,cluster]"]
    args = ["eval", str(tiny_run / "export"), f"data.source={module_tiny_dataset_dir}", *common]
    assert main([*args, f"eval.json={direct}"]) == 0
    config = str(tiny_run / "config.yaml")  # the tiny recipe has no eval split: name one
    args = ["eval", str(tiny_run / "export"), "--config", config, "data.eval_split=test", *common]
    assert main([*args, f"eval.json={from_run}"]) == 0
    assert json.loads(from_run.read_text()) == json.loads(direct.read_text())


def test_eval_help_lists_the_data_and_eval_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "eval.protocols=[knn,linear,lowshot,cluster]" in out
    assert "data.eval_split=test" in out and "data.source=digits" in out
    assert "optim.lr" not in out  # training options are not eval's


def test_probes_fit_on_a_bounded_sample_and_say_so(tiny_run, module_tiny_dataset_dir, tmp_path):
    sizes = {}
    for limit in (0, 24):
        out = tmp_path / f"probe{limit}.json"
        args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[linear,lowshot]",
                         f"eval.probe_max_samples={limit}", f"eval.json={out}")  # fmt: skip
        assert main(args) == 0
        report = json.loads(out.read_text())
        assert "linear_top1" in report["pcl backbone"]
        sizes[limit] = {name: row["probe_train_samples"] for name, row in report.items()}
    assert sizes == {0: {"raw pixels": 48, "pcl backbone": 48},
                     24: {"raw pixels": 24, "pcl backbone": 24}}  # fmt: skip


def test_eval_names_what_it_extracts_and_each_protocol_as_it_starts(
    tiny_run, module_tiny_dataset_dir, capsys
):
    args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[knn,cluster,linear]")
    assert main(args) == 0
    err = capsys.readouterr().err
    for encoder in ("raw pixels", "pcl backbone"):
        assert f"[eval] extract train (48 images) through {encoder} ..." in err
        assert f"[eval] extract test (16 images) through {encoder}: done in" in err
        for protocol in ("knn", "cluster", "linear"):
            assert f"[eval] {protocol} on {encoder} ..." in err
            assert f"[eval] {protocol} on {encoder}: done in" in err
    # each protocol in the requested order, after its encoder's extraction
    starts = [err.index(f"[eval] {p} on pcl backbone ...") for p in ("knn", "cluster", "linear")]
    assert err.index("through pcl backbone ...") < starts[0] < starts[1] < starts[2]


def test_eval_on_a_terminal_draws_an_extraction_bar(tiny_run, module_tiny_dataset_dir, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[knn]")) == 0
    text = terminal.getvalue()
    assert "\rextract train (48 images) through pcl backbone: " in text  # tqdm's redrawn line
    assert "[eval] knn on pcl backbone ..." in text


def test_an_interrupted_eval_keeps_the_protocols_it_finished(
    tiny_run, module_tiny_dataset_dir, tmp_path, monkeypatch
):
    import pcl_scale.evaluation.protocols as protocols

    def broken_probe(*args, **kwargs):
        raise RuntimeError("stopped in the linear probe")

    monkeypatch.setattr(protocols, "linear_probe", broken_probe)
    out = tmp_path / "eval.json"
    args = eval_args(tiny_run, module_tiny_dataset_dir, "eval.protocols=[knn,linear]")
    with pytest.raises(RuntimeError, match="stopped in the linear probe"):
        main([*args, f"eval.json={out}"])
    report = json.loads(out.read_text())  # the first protocol's results survived
    assert list(report) == ["raw pixels"]
    assert set(report["raw pixels"]) == {"knn200_top1", "knn200_top5", "knn5_top1", "knn5_top5"}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left
