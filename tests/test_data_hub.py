"""Datasets as the Hub lays them out: a repository's folder, data.data_files, data.name.

Each test writes its own small parquet files (8x8 PIL images in a ``datasets.Dataset``); the
train and test splits have different sizes, so a merged or swapped split shows in the row count.
"""

import random
from pathlib import Path

import pytest

from pcl_scale.config import ConfigError, DataConfig, load_config
from pcl_scale.data import _first_rows, _overlap, labels_of, load_split
from pcl_scale.errors import DataError
from pcl_scale.validation import validate

from .conftest import make_hf_dataset

TRAIN_ROWS, TEST_ROWS = 30, 10


def write_parquet(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_hf_dataset(n, seed=seed).to_parquet(str(path))
    return path


@pytest.fixture
def hub_repo(tmp_path: Path) -> Path:
    """What ``huggingface-cli download --repo-type dataset`` writes: split names in file names."""
    repo = tmp_path / "repo"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", TRAIN_ROWS, seed=0)
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", TEST_ROWS, seed=1)
    (repo / "README.md").write_text("# a dataset card without a configs block\n")
    return repo


def cfg_for(source: object, **kw: object) -> DataConfig:
    return DataConfig(**{"source": str(source), "num_workers": 0, **kw})  # type: ignore[arg-type]


def test_repository_layout_loads_its_splits(hub_repo):
    cfg = cfg_for(hub_repo, eval_split="test")
    train, test = load_split(cfg), load_split(cfg, cfg.eval_split)
    assert (len(train), len(test)) == (TRAIN_ROWS, TEST_ROWS)
    assert train[0]["image"].size == (8, 8)
    labels = labels_of(test, cfg)
    assert labels is not None and labels.shape == (TEST_ROWS,)


def test_data_files_map_splits_to_files(tmp_path, monkeypatch):
    """Dotted overrides, one mapping on the command line, and a YAML recipe: train and test
    files stay apart."""
    write_parquet(tmp_path / "a" / "part-0.parquet", TRAIN_ROWS, seed=0)
    write_parquet(tmp_path / "b" / "part-0.parquet", TEST_ROWS, seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  source: {tmp_path}\n  eval_split: test\n"
        f"  data_files:\n    train: a/*.parquet\n    test: b/*.parquet\n"
    )
    monkeypatch.chdir(tmp_path)
    configs = [
        load_config(
            None,
            [
                f"data.source={tmp_path}",
                "data.data_files.train=a/*.parquet",
                "data.data_files.test=b/*.parquet",
            ],
        ),
        load_config(
            None, ["data.source=.", "data.data_files={train: a/*.parquet, test: b/*.parquet}"]
        ),
        load_config(recipe),
    ]
    for cfg in configs:
        assert cfg.data.data_files == {"train": "a/*.parquet", "test": "b/*.parquet"}
        assert len(load_split(cfg.data, "train")) == TRAIN_ROWS
        assert len(load_split(cfg.data, "test")) == TEST_ROWS


def test_glob_of_train_and_test_files_is_refused_for_evaluation(hub_repo):
    """A glob is one split: asking it for a held-out split names the fix instead of scoring the
    training images against themselves (before, both splits were all 40 rows)."""
    pattern = str(hub_repo / "data" / "*.parquet")
    assert len(load_split(cfg_for(pattern))) == TRAIN_ROWS + TEST_ROWS  # one split, 'train'
    for kw in ({"eval_split": "test"}, {"split": "test"}):
        option = next(iter(kw))
        with pytest.raises(DataError) as caught:
            load_split(cfg_for(pattern, **kw))
        message = str(caught.value)
        assert f"data.{option}='test' asks for a split" in message
        assert f"data.source={pattern!r} names files" in message
        assert "data.data_files" in message and "dataset folder as data.source" in message


def test_readme_configs_block_and_data_name(tmp_path):
    repo = tmp_path / "configs_repo"
    for config, (n_train, n_test) in {"big": (20, 6), "small": (8, 4)}.items():
        write_parquet(repo / config / "fit.parquet", n_train, seed=0)
        write_parquet(repo / config / "held.parquet", n_test, seed=1)
    blocks = "".join(
        f"- config_name: {config}\n"
        f"  data_files:\n"
        f"  - split: train\n    path: {config}/fit.parquet\n"
        f"  - split: test\n    path: {config}/held.parquet\n"
        for config in ("big", "small")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{blocks}---\n# two configs\n")
    sizes = {}
    for name in ("big", "small"):
        cfg = cfg_for(repo, name=name)
        sizes[name] = (len(load_split(cfg)), len(load_split(cfg, "test")))
    assert sizes == {"big": (20, 6), "small": (8, 4)}
    with pytest.raises(DataError, match=r"name='tiny'.*'tiny' not found.*big.*small"):
        load_split(cfg_for(repo, name="tiny"))


def test_missing_split_lists_the_splits_before_training(tmp_path):
    repo = tmp_path / "train_only"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", TRAIN_ROWS, seed=0)
    with pytest.raises(
        DataError,
        match=r"split 'validation' not found .*available splits: train\. "
        r"Set data\.eval_split to one of them, or map files to splits with data\.data_files",
    ):
        load_split(cfg_for(repo, eval_split="validation"))  # the training split's load


def test_single_saved_dataset_is_not_its_own_held_out_split(tmp_path):
    path = tmp_path / "single"
    make_hf_dataset(12).save_to_disk(str(path))
    assert len(load_split(cfg_for(path))) == 12
    with pytest.raises(DataError, match=r"data.eval_split='test' asks for a held-out split"):
        load_split(cfg_for(path, eval_split="test"))


def test_hub_options_reach_load_dataset_or_are_refused(tmp_path, hub_repo):
    with pytest.raises(
        DataError,
        match=r"load_dataset\('someone/not-cached', name='cfg', revision='v2'\).*offline",
    ):
        load_split(cfg_for("someone/not-cached", name="cfg", revision="v2"))
    with pytest.raises(DataError, match=r"data.revision='v2' .* is a local path"):
        load_split(cfg_for(hub_repo, revision="v2"))
    pattern = str(hub_repo / "data" / "*.parquet")
    with pytest.raises(DataError, match=r"names data files; data.data_files and data.name"):
        load_split(cfg_for(pattern, data_files={"test": "x.parquet"}))
    with pytest.raises(DataError, match=r"cannot load dataset .*data_files=.*nope"):
        load_split(cfg_for(hub_repo, data_files={"train": "nope/*.parquet"}))
    cfg = load_config(None, ["data.data_files.train=a/*.parquet"])  # data.source: digits
    with pytest.raises(ConfigError, match=r"data.data_files=.* data.source='digits' is built in"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"a split name and a file or glob"):
        validate(load_config(None, [f"data.source={hub_repo}", "data.data_files.test=''"]))


def pixels(ds) -> list[bytes]:
    return [row["image"].tobytes() for row in ds]


@pytest.mark.parametrize(
    ("train", "held_out"),
    [("train[:24]", "train[24:]"), ("train[:80%]", "train[-20%:]"),
     ("train[:10]+train[20:]", "train[10:20]")],
)  # fmt: skip
def test_split_slices_select_the_rows_load_dataset_selects(hub_repo, train, held_out):
    """A validation part of the training split: the same rows as ``load_dataset(split=...)``."""
    import datasets

    cfg = cfg_for(hub_repo, split=train, eval_split=held_out)
    ours = load_split(cfg), load_split(cfg, cfg.eval_split)
    for split, rows in zip((train, held_out), ours, strict=True):
        expected = datasets.load_dataset(str(hub_repo), split=split)
        assert pixels(rows) == pixels(expected) and rows["label"] == expected["label"]
    assert len(ours[0]) + len(ours[1]) == TRAIN_ROWS


def test_held_out_rows_that_were_trained_on_are_refused(hub_repo):
    cfg = cfg_for(hub_repo, split="train[:20]", eval_split="train[15:]")
    with pytest.raises(DataError, match=r"shares 5 rows of split 'train'.*first row 15"):
        load_split(cfg)
    # data.max_samples trains on the first rows only: the rows past them are held out
    assert len(load_split(cfg_for(hub_repo, max_samples=20, eval_split="train[20:]"))) == 20
    with pytest.raises(DataError, match=r"shares 1 rows"):
        load_split(cfg_for(hub_repo, max_samples=20, eval_split="train[19:]"))
    with pytest.raises(DataError, match=r"shares 10 rows.*first row 5"):
        load_split(cfg_for(hub_repo, split="train[:10]+train[20:]", eval_split="train[5:25]"))


def test_shared_rows_of_slices_match_the_row_sets():
    """Slices are compared as ranges (no row arrays at 100M rows); a slow set reference."""
    rng = random.Random(0)
    for _ in range(200):

        def ranges() -> list[range]:
            starts = sorted(rng.sample(range(60), 4))
            return [range(a, a + rng.randint(0, 8)) for a in starts]

        a, b, cap = ranges(), ranges(), rng.randint(1, 30)
        rows_a = [i for r in a for i in r][:cap]
        assert [i for r in _first_rows(a, cap) for i in r] == rows_a
        shared = set(rows_a) & {i for r in b for i in r}
        assert _overlap(_first_rows(a, cap), b) == (len(shared), min(shared, default=None))


@pytest.mark.parametrize("bad", ["train[x]", "train[3:1]", "train[:10]+test[:2]"])
def test_a_bad_slice_is_refused_with_the_syntax(hub_repo, bad):
    with pytest.raises(DataError, match=r"data\.eval_split=.*(not a split slice|selects no rows)"):
        load_split(cfg_for(hub_repo, split="train[:5]", eval_split=bad))


def test_single_saved_dataset_holds_out_a_slice_of_itself(tmp_path):
    path = tmp_path / "single"
    make_hf_dataset(12).save_to_disk(str(path))
    cfg = cfg_for(path, split="train[:9]", eval_split="train[9:]")
    assert (len(load_split(cfg)), len(load_split(cfg, cfg.eval_split))) == (9, 3)
    with pytest.raises(DataError, match=r"shares 3 rows"):
        load_split(cfg_for(path, eval_split="train[9:]"))
