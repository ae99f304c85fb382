"""Data for fine-tuning, calibration and statistics.

A data *spec* is one of:

- ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images,
  10 classes), upscaled and made 3-channel; needs no download. Fixed 80/20 train/test split.
- a directory: an ImageFolder (one sub-folder per class). With ``train/`` and
  ``val/``-like sub-folders those are the splits; otherwise a fixed stratified 80/20
  hold-out of the folder is used, so "my images in class folders" just works.
- ``NAME:ROOT``: any map-style timm dataset, e.g. ``torch/cifar10:/data/cifar10``
  (never downloaded).

Images go through timm's ``create_transform``. For training, :func:`resumable_loader`
fixes the sample order and every sample's augmentation by ``(seed, epoch, index)``,
so that a resumed run sees exactly the data the interrupted one would have seen,
whatever the number of worker processes or ranks.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from ..errors import DataError, require

__all__ = [
    "DIGITS",
    "DataError",
    "DigitsDataset",
    "EpochSampler",
    "SeededDataset",
    "digits_loaders",
    "make_dataset",
    "make_loader",
    "num_classes",
    "resumable_loader",
]

DIGITS = "digits"
HOLDOUT_FRACTION = 0.2  # test share of the digits set and of a folder without split sub-folders
SPLIT_SEED = 0  # the hold-out split never changes with the training seed
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("validation", "val", "valid", "test", "eval", "evaluation")


def is_train_split(split: str) -> bool:
    """True for a training split name, False for an evaluation one; anything else is an error."""
    if split in TRAIN_SPLITS:
        return True
    if split in EVAL_SPLITS:
        return False
    raise DataError(f"unknown split {split!r}: use one of {', '.join(TRAIN_SPLITS + EVAL_SPLITS)}")


def _holdout(targets: np.ndarray, train: bool) -> np.ndarray:
    """Indices of the fixed stratified train or test part of a labelled set."""
    indices = np.arange(len(targets))
    stratify = targets if np.unique(targets, return_counts=True)[1].min() >= 2 else None
    train_idx, test_idx = require("sklearn.model_selection", "train").train_test_split(
        indices, test_size=HOLDOUT_FRACTION, stratify=stratify, random_state=SPLIT_SEED)
    return np.sort(train_idx if train else test_idx)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as ``(3, img_size, img_size)`` float images.

    Pixels are scaled to [0, 1], normalised with the training split's mean and standard
    deviation, upscaled bilinearly (per sample, so large sizes cost no memory) and
    repeated over 3 channels so that any ImageNet-shaped timm model takes them.
    """

    num_classes = 10

    def __init__(self, split: str = "train", img_size: int = 32) -> None:
        digits = require("sklearn.datasets", "train").load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
        train_images = images[_holdout(digits.target, train=True)]
        keep = _holdout(digits.target, train=is_train_split(split))
        self.images = (images[keep] - train_images.mean()) / train_images.std()
        self.targets = torch.from_numpy(digits.target[keep])
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = F.interpolate(self.images[index][None], size=(self.img_size,) * 2, mode="bilinear", align_corners=False)
        return image[0].expand(3, -1, -1), int(self.targets[index])


def _split_dir(root: Path, split: str) -> Path | None:
    """The sub-folder of ``root`` that holds ``split`` (``train/``, ``val/``, ...), if any."""
    names = TRAIN_SPLITS if is_train_split(split) else EVAL_SPLITS
    return next((root / name for name in names if (root / name).is_dir()), None)


def _image_folder(root: Path) -> Dataset:
    try:
        return create_dataset("", root=str(root), search_split=False)
    except RuntimeError as err:  # timm: "Found 0 images in subfolders of ..."
        raise DataError(f"cannot use {root} as an ImageFolder: {err}") from err


def _folder_dataset(root: Path, split: str) -> Dataset:
    """An ImageFolder split: its own sub-folder when there is one, else a fixed hold-out."""
    if any((root / name).is_dir() for name in TRAIN_SPLITS):
        split_root = _split_dir(root, split)
        if split_root is None:
            raise DataError(f"{root} has a training folder but no {split!r} folder ({'/'.join(EVAL_SPLITS)})")
        return _image_folder(split_root)
    dataset = _image_folder(root)
    targets = np.array([target for _, target in dataset.reader.samples])
    return Subset(dataset, _holdout(targets, train=is_train_split(split)).tolist())


def _set_transform(dataset: Dataset, transform: Any) -> None:
    (dataset.dataset if isinstance(dataset, Subset) else dataset).transform = transform


def make_dataset(
    spec: str,
    split: str,
    img_size: int = 32,
    *,
    augment: bool | None = None,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Dataset:
    """The ``split`` of data ``spec`` (see the module doc) as ``(image, label)`` samples.

    ``augment`` (default: on for a training split) selects timm's training transform
    (random resized crop, flip, colour jitter) instead of resize + centre crop; ``mean``
    and ``std`` normalise folder and timm images (the digits set normalises itself).
    """
    if spec == DIGITS:
        return DigitsDataset(split, img_size)
    train = is_train_split(split)
    path = Path(spec).expanduser()
    if path.is_dir():
        dataset = _folder_dataset(path, split)
    elif ":" in spec and "/" in spec.split(":", 1)[0]:
        name, root = spec.split(":", 1)
        try:
            dataset = create_dataset(name, root=str(Path(root).expanduser()), split=split, download=False)
        except (AssertionError, RuntimeError, OSError, ValueError) as err:
            raise DataError(f"cannot open timm dataset {name!r} at {root}: {err}") from err
    else:
        raise DataError(
            f"unknown data {spec!r}: give 'digits', an ImageFolder directory, or a timm dataset "
            "spec NAME:ROOT such as torch/cifar10:/data/cifar10")
    if isinstance(dataset, IterableDataset):
        raise DataError(f"{spec} is a streaming dataset; icrewrite needs a map-style (indexable) one")
    is_training = train if augment is None else augment
    _set_transform(dataset, create_transform(img_size, is_training=is_training, mean=mean, std=std))
    return dataset


def make_loader(
    spec: str,
    split: str,
    batch_size: int,
    img_size: int = 32,
    *,
    shuffle: bool | None = None,
    num_workers: int = 0,
    seed: int = 0,
    **dataset_options: Any,
) -> DataLoader:
    """A ``DataLoader`` over the ``split`` of data ``spec``; what ``--data`` and ``--calibrate`` use.

    A training split is shuffled (with a generator seeded by ``seed``) and drops its
    last incomplete batch, which could hold a single sample that BatchNorm cannot use.
    """
    train = is_train_split(split)
    return DataLoader(
        make_dataset(spec, split, img_size, **dataset_options),
        batch_size=batch_size,
        shuffle=train if shuffle is None else shuffle,
        drop_last=train,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def digits_loaders(batch_size: int, img_size: int = 32, **options: Any) -> tuple[DataLoader, DataLoader]:
    """``(train, test)`` loaders over the embedded digits set."""
    return (make_loader(DIGITS, "train", batch_size, img_size, **options),
            make_loader(DIGITS, "test", batch_size, img_size, **options))


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset made by :func:`make_dataset`."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, DigitsDataset):
        return base.num_classes
    reader = getattr(base, "reader", None)
    classes = getattr(reader, "class_to_idx", None) or getattr(base, "classes", None)
    if not classes:
        raise DataError(f"cannot tell the number of classes of {type(base).__name__}")
    return len(classes)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys in an order fixed by ``(seed, epoch)``, one shard per rank.

    ``set_epoch(epoch, skip)`` starts an epoch after its first ``skip`` samples of this
    rank's shard: that is how a resumed run continues mid-epoch. With ``even=True`` (for
    training) the order is cut to a multiple of ``world_size`` so every rank runs the
    same number of steps, which DistributedDataParallel needs; evaluation shards are
    left uneven so that no sample is dropped or counted twice.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, even: bool = True) -> None:
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        if self.even:
            order = order[: self.num_samples - self.num_samples % self.world_size]
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self._shard()[self.skip:])

    def __len__(self) -> int:
        total = self.num_samples - self.num_samples % self.world_size if self.even else self.num_samples
        shard = len(range(self.rank, total, self.world_size))
        return max(shard - self.skip, 0)


@contextlib.contextmanager
def _seeded_sampling(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and ``numpy`` for a block, then restore their states."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededDataset(Dataset):
    """Indexed by ``(epoch, index)`` keys: each sample's random augmentation is drawn from
    a seed fixed by ``(seed, epoch, index)``, independent of worker processes and resumes."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with _seeded_sampling(sample_seed):
            return self.dataset[index]


def resumable_loader(loader: DataLoader, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A copy of ``loader`` driven by an :class:`EpochSampler`: sharded over ranks, its order
    and augmentation fixed by ``(seed, epoch)``, able to start mid-epoch.

    Keeps ``loader``'s dataset, batch size (per rank), workers and collate function.
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise DataError("training needs a DataLoader over a map-style dataset with a batch_size (not a batch_sampler)")
    sampler = EpochSampler(len(loader.dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           even=shuffle)
    return DataLoader(
        SeededDataset(loader.dataset, seed),
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        generator=torch.Generator(),  # a private one: starting an epoch must not draw from the global RNG
    )
