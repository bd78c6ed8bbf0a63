from typing import Any

import datasets
import pytest
import torch

from pcl_scale.config import DataConfig
from pcl_scale.data import (
    IndexedImages,
    device_input,
    eval_transform,
    labels_of,
    load_split,
    train_transform,
)
from pcl_scale.errors import DataError

from .conftest import make_hf_dataset, make_images


def cfg_for(source, **kw) -> DataConfig:
    base: dict = dict(source=str(source), image_size=8, resize_size=8, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def check_dataset(ds, cfg, n):
    assert len(ds) == n
    view = IndexedImages(ds, cfg.image_column, eval_transform(cfg))
    image, index = view[n - 1]
    assert index == n - 1 and image.shape == (3, 8, 8) and image.dtype == torch.uint8
    (q, k), idx = IndexedImages(ds, cfg.image_column, train_transform(cfg))[0]
    assert q.shape == k.shape == (3, 8, 8) and idx == 0
    labels = labels_of(ds, cfg)
    assert labels is not None and labels.shape == (n,)


def test_affine_views_rotate_and_stay_seeded():
    from PIL import Image

    bar = torch.zeros(32, 32, dtype=torch.uint8)
    bar[14:18, 4:28] = 255  # a horizontal bar: rotation tilts it, a crop alone cannot
    image = Image.fromarray(bar.numpy()).convert("RGB")

    def views(**kw):
        cfg = DataConfig(image_size=32, crop_min_scale=1.0, hflip=False, **kw)
        torch.manual_seed(0)
        pairs = [train_transform(cfg)(image) for _ in range(8)]
        # lit pixels outside the bar's rows: only a rotation or shear puts them there
        return [float((q[0, :12] > q[0].float().mean()).float().mean()) for q, _ in pairs]

    assert views() == views() and max(views()) == 0.0
    rotated = views(rotate_degrees=30.0)
    assert rotated == views(rotate_degrees=30.0) and max(rotated) > 0.0


def test_save_to_disk_dict_and_single(tmp_path, tiny_dataset_dir):
    check_dataset(load_split(cfg_for(tiny_dataset_dir)), cfg_for(tiny_dataset_dir), 48)
    check_dataset(load_split(cfg_for(tiny_dataset_dir), "test"), cfg_for(tiny_dataset_dir), 16)
    single = tmp_path / "single"
    make_hf_dataset(10).save_to_disk(str(single))
    check_dataset(load_split(cfg_for(single)), cfg_for(single), 10)


def test_image_folder(tmp_path):
    images, labels = make_images(12)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = tmp_path / "folder" / "train" / f"class{lab}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.png")
    cfg = cfg_for(tmp_path / "folder")
    ds = load_split(cfg)
    check_dataset(ds, cfg, 12)
    labels = labels_of(ds, cfg)
    assert labels is not None and sorted(set(labels.tolist())) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_parquet_and_arrow_files(tmp_path, kind):
    ds = make_hf_dataset(9)
    if kind == "parquet":
        path = tmp_path / "data.parquet"
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    cfg = cfg_for(path)
    check_dataset(load_split(cfg), cfg, 9)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / mode
    make_hf_dataset(4, mode=mode).save_to_disk(str(path))
    cfg = cfg_for(path)
    image, _ = IndexedImages(load_split(cfg), "image", eval_transform(cfg))[0]
    assert image.shape == (3, 8, 8)


def test_builtin_digits_and_mnist(tmp_path):
    digits = cfg_for("digits", cache_dir=str(tmp_path))
    assert len(load_split(digits)) == 1437 and len(load_split(digits, "test")) == 360
    check_dataset(load_split(digits, "test"), digits, 360)
    mnist = cfg_for("mnist", cache_dir=str(tmp_path), max_samples=100)
    ds = load_split(mnist, "test")
    check_dataset(ds, mnist, 100)
    labels = labels_of(ds, mnist)
    assert labels is not None and labels[:5].tolist() == [7, 2, 1, 0, 4]  # official test order


def test_errors_name_the_problem(tmp_path, tiny_dataset_dir):
    with pytest.raises(DataError, match="does not exist"):
        load_split(cfg_for(tmp_path / "nope"))
    with pytest.raises(
        DataError, match=r"image column 'img' not found.*available columns: image, label"
    ):
        load_split(cfg_for(tiny_dataset_dir, image_column="img"))
    with pytest.raises(DataError, match=r"label column 'y' not found.*label_column=''"):
        load_split(cfg_for(tiny_dataset_dir, label_column="y"))
    with pytest.raises(DataError, match=r"split 'validation' not found.*train, test"):
        load_split(cfg_for(tiny_dataset_dir), "validation")
    empty = tmp_path / "empty.parquet"
    make_hf_dataset(4).select([]).to_parquet(str(empty))
    with pytest.raises(DataError, match="is empty"):
        load_split(cfg_for(empty))
    empty_saved = tmp_path / "empty_saved"
    make_hf_dataset(4).select([]).save_to_disk(str(empty_saved))
    with pytest.raises(DataError, match="empty or damaged"):
        load_split(cfg_for(empty_saved))
    with pytest.raises(DataError, match="offline"):
        load_split(cfg_for("someone/not-cached-dataset"))


def test_corrupt_image_names_the_index(tmp_path):
    ds = make_hf_dataset(5)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][3] = {"bytes": b"not an image", "path": None}
    bad = datasets.Dataset.from_dict(rows, features=ds.features)
    cfg = cfg_for("unused")
    view = IndexedImages(bad, "image", eval_transform(cfg))
    view[2]
    with pytest.raises(DataError, match="dataset index 3"):
        view[3]


@pytest.mark.parametrize("n, world", [(1437, 1), (1437, 2), (1000, 4), (7, 3)])
def test_epoch_order_is_distributed_samplers_order_as_a_tensor(n, world):
    from torch.utils.data import DistributedSampler

    from pcl_scale.engine.loaders import EpochOrder

    for epoch in (0, 3):
        for rank in range(world):
            reference: DistributedSampler[int] = DistributedSampler(
                range(n),  # type: ignore[arg-type]  # any sized sequence serves
                num_replicas=world,
                rank=rank,
                shuffle=True,
                seed=5,
                drop_last=True,
            )
            reference.set_epoch(epoch)
            order = EpochOrder(n, world, rank, seed=5)
            order.set_epoch(epoch, skip=2)
            assert order.indices.dtype == torch.int32  # no list of Python ints per rank
            assert list(order) == [(epoch, i) for i in list(reference)[2:]]
            assert len(order) == len(reference) - 2


@pytest.mark.parametrize("aug", ["aug", "aug_plus"])
def test_uint8_views_normalised_on_the_device_equal_the_float_pipeline(tiny_dataset_dir, aug):
    """Workers return uint8; DeviceInput's cast and normalisation give ToTensor + Normalize's
    floats bit for bit, for the same seeded augmentations (the reference pipeline, built here)."""
    from torchvision import transforms as T

    cfg = cfg_for(tiny_dataset_dir, aug=aug, mean=[0.3, 0.4, 0.5], std=[0.2, 0.25, 0.3])
    ds = load_split(cfg)
    to_input = device_input(cfg, torch.device("cpu"))
    float_tail = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    uint8_view: Any = train_transform(cfg).transform  # a Compose
    reference = T.Compose([*uint8_view.transforms[:-1], float_tail])  # PILToTensor -> float
    for i in range(6):
        image = ds[i]["image"].convert("RGB")
        torch.manual_seed(i)
        fast = to_input(uint8_view(image)[None])[0]
        torch.manual_seed(i)
        assert torch.equal(fast, reference(image))
    image = ds[0]["image"].convert("RGB")
    e_step = to_input(eval_transform(cfg)(image)[None])[0]
    assert torch.equal(e_step, eval_transform(cfg, as_uint8=False)(image))


def test_sample_augmentations_follow_epoch_and_index_only(tiny_dataset_dir):
    """(epoch, index) keys: a sample's views are the same whatever the worker count and the
    order it is loaded in, and differ across epochs."""
    from torch.utils.data import DataLoader

    cfg = cfg_for(tiny_dataset_dir, aug="aug_plus")
    view = IndexedImages(load_split(cfg), "image", train_transform(cfg), seed_parts=(0, 1))
    keys = [(3, i) for i in range(8)]

    def loaded(order, workers):
        loader = DataLoader(view, batch_size=4, sampler=order, num_workers=workers)
        out = {}
        for (q, k), index in loader:
            out.update({int(j): (a, b) for j, a, b in zip(index, q, k, strict=True)})
        return out

    inline = loaded(keys, 0)
    shuffled = loaded(keys[::-1], 2)
    for i in range(8):
        assert torch.equal(inline[i][0], shuffled[i][0]) and torch.equal(
            inline[i][1], shuffled[i][1]
        )
        assert not torch.equal(inline[i][0], inline[i][1])  # two different views
    (q_next, _), _ = view[(4, 0)]
    assert not torch.equal(q_next, inline[0][0])  # another epoch, another augmentation
