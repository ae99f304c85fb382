"""Data for fine-tuning, calibration and statistics.

A data *spec* is one of:

- ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images,
  10 classes), upscaled and made 3-channel; needs no download. Fixed 80/20 train/test split.
- a directory: an ImageFolder (one sub-folder per class). With ``train/`` and
  ``val/``-like sub-folders those are the splits; otherwise a fixed stratified 80/20
  hold-out of the folder is used, so "my images in class folders" just works.
  One class index serves both splits: the sorted class folder names of the training
  split (hidden entries such as ``.ipynb_checkpoints/`` and AppleDouble ``._x.png`` are
  not data). A class found only in validation is refused, one missing from validation is
  reported, and an image that does not decode is an error naming it (never replaced by
  another sample). 16-bit and float greyscale images are scaled to 8 bit, not clipped.
- ``NAME:ROOT``: any map-style timm dataset, e.g. ``torch/cifar10:/data/cifar10``
  (never downloaded).

Images go through timm's ``create_transform``. For training, :func:`resumable_loader`
fixes the sample order and every sample's augmentation by ``(seed, epoch, index)``,
so that a resumed run sees exactly the data the interrupted one would have seen,
whatever the number of worker processes or ranks.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .. import model_info
from ..compat import forked_rng
from ..errors import DataError, require

__all__ = [
    "DIGITS",
    "DataError",
    "DigitsDataset",
    "EpochSampler",
    "ImageFolder",
    "SeededDataset",
    "class_names",
    "digits_loaders",
    "folder_classes",
    "make_dataset",
    "make_loader",
    "model_class_names",
    "num_classes",
    "read_image",
    "resumable_loader",
    "set_model_class_names",
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
    """Indices of the fixed train or test part of a labelled set: stratified by class when
    every class can have a sample on both sides, else a plain seeded split (reported)."""
    indices = np.arange(len(targets))
    test_size = math.ceil(HOLDOUT_FRACTION * len(targets))  # as scikit-learn rounds a fraction
    if len(targets) - test_size < 1:
        raise DataError(f"{len(targets)} image(s) cannot be split into training and validation parts; "
                        "give more images or train/ and val/ folders")
    counts = np.unique(targets, return_counts=True)[1]
    stratify = targets if counts.min() >= 2 and min(test_size, len(targets) - test_size) >= len(counts) else None
    if stratify is None:
        warnings.warn(f"{len(counts)} classes in {len(targets)} images: too few for a split with every class on "
                      f"both sides; held out a random {HOLDOUT_FRACTION:.0%} (some classes are only on one side)",
                      stacklevel=3)
    train_idx, test_idx = require("sklearn.model_selection", "train").train_test_split(
        indices, test_size=test_size, stratify=stratify, random_state=SPLIT_SEED)
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


def _visible(name: str) -> bool:
    """False for hidden entries: ``.ipynb_checkpoints/``, ``.DS_Store``, AppleDouble ``._x.png``."""
    return not name.startswith(".")


def folder_classes(root: Path) -> list[str]:
    """The class names of an ImageFolder: its visible sub-folders, sorted."""
    try:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and _visible(entry.name))
    except OSError as err:
        raise DataError(f"cannot read {root}: {err.strerror or err}") from err


def _to_8bit(image: Image.Image, path: str) -> Image.Image:
    """``image`` as 8-bit, for the modes that ``convert("RGB")`` would clip: 16-bit integers
    (full range 0..65535) are scaled by 255/65535, floats in [0, 1] by 255; others refused."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.min() >= 0 and pixels.max() <= 65535):
        scaled = pixels.astype(np.float64) * (255 / 65535)
    elif image.mode == "F" and pixels.min() >= 0 and pixels.max() <= 1:
        scaled = pixels.astype(np.float64) * 255
    else:
        raise DataError(f"{path}: {image.mode} image with values in [{pixels.min()}, {pixels.max()}]: icrewrite "
                        "reads 16-bit images in 0..65535 and float images in [0, 1]; convert it to 8 or 16 bit")
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def read_image(path: str) -> Image.Image:
    """The RGB image in file ``path``, decoded now; high-bit-depth greyscale is scaled, not clipped.
    A file that does not decode raises :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                image = _to_8bit(image, path)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DataError(f"cannot decode image {path}: {reason}") from err


class ImageFolder(DatasetFolder):
    """The images under ``root/<class>/`` (any depth) for the given class index ``classes``:
    a class folder missing under ``root`` has no samples, folders not in ``classes`` and
    hidden entries are not read. Samples are ``(RGB image, class index)`` via :func:`read_image`."""

    def __init__(self, root: Path, classes: list[str], transform: Any = None) -> None:
        self._index = list(classes)
        root = Path(root)

        def is_image(path: str) -> bool:
            relative = Path(path).relative_to(root)
            return all(_visible(part) for part in relative.parts) and path.lower().endswith(IMG_EXTENSIONS)

        super().__init__(str(root), loader=read_image, transform=transform, is_valid_file=is_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._index, {name: index for index, name in enumerate(self._index)}


def _image_folder(root: Path, classes: list[str]) -> ImageFolder:
    """The ImageFolder at ``root`` read with ``classes``; refused when it holds no image, or its
    first image does not decode (a folder of files that are not images)."""
    if not classes:
        raise DataError(f"cannot use {root} as an ImageFolder: it has no class sub-folders")
    dataset = ImageFolder(root, classes)
    if not dataset.samples:
        raise DataError(f"cannot use {root} as an ImageFolder: found no images ({', '.join(IMG_EXTENSIONS)}) in "
                        f"its class folders")
    read_image(dataset.samples[0][0])
    return dataset


def _check_eval_classes(train_root: Path, eval_root: Path, dataset: ImageFolder) -> None:
    """Refuse an evaluation split with classes the training split lacks; report those it lacks."""
    extra = sorted(set(folder_classes(eval_root)) - set(dataset.classes))
    if extra:
        raise DataError(f"{eval_root} has class folder(s) {', '.join(extra)} that {train_root} has not: the model "
                        "has no output for them; remove them or add them to the training data")
    present = {target for _, target in dataset.samples}
    missing = [name for index, name in enumerate(dataset.classes) if index not in present]
    if missing:
        warnings.warn(f"{eval_root} has no images of {len(missing)} of the {len(dataset.classes)} training classes "
                      f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); validation covers the others",
                      stacklevel=3)


def _folder_dataset(root: Path, split: str) -> Dataset:
    """An ImageFolder split: its own sub-folder when there is one, else a fixed hold-out; the
    class index is the training split's either way."""
    train_root = _split_dir(root, "train")
    if train_root is not None:
        split_root = _split_dir(root, split)
        if split_root is None:
            raise DataError(f"{root} has a training folder but no {split!r} folder ({'/'.join(EVAL_SPLITS)})")
        dataset = _image_folder(split_root, folder_classes(train_root))
        if split_root != train_root:
            _check_eval_classes(train_root, split_root, dataset)
        return dataset
    dataset = _image_folder(root, folder_classes(root))
    return Subset(dataset, _holdout(np.array(dataset.targets), train=is_train_split(split)).tolist())


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
    auto_augment: str | None = None,
    re_prob: float = 0.0,
) -> Dataset:
    """The ``split`` of data ``spec`` (see the module doc) as ``(image, label)`` samples.

    ``augment`` (default: on for a training split) selects timm's training transform
    (random resized crop, flip, colour jitter, and ``auto_augment`` (a timm policy such as
    ``rand-m9-mstd0.5``) and random erasing with probability ``re_prob``) instead of resize +
    centre crop; ``mean`` and ``std`` normalise folder and timm images (the digits set
    normalises itself).
    """
    if spec == DIGITS:
        if auto_augment or re_prob:
            raise DataError("auto-augmentation and random erasing (--aa, --reprob) apply to image folders and timm "
                            "datasets; the digits set is tensors")
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
    recipe = {"auto_augment": auto_augment, "re_prob": re_prob} if is_training else {}
    try:
        transform = create_transform(img_size, is_training=is_training, mean=mean, std=std, **recipe)
    except (AssertionError, ValueError, KeyError) as err:  # timm's policy parser: an unknown --aa
        raise DataError(f"cannot build the training transform (auto_augment={auto_augment!r}): {err!r}") from err
    _set_transform(dataset, transform)
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


def class_names(dataset: Dataset) -> list[str] | None:
    """The class names of a dataset, in class-index order (None when it does not say): what
    a trained model's outputs mean. Digits are ``"0"`` .. ``"9"``; a folder's are its
    training class folders; a timm/torchvision dataset's are its ``classes``."""
    base = dataset.dataset if isinstance(dataset, (Subset, SeededDataset)) else dataset
    if isinstance(base, (Subset, SeededDataset)):
        return class_names(base)
    if isinstance(base, DigitsDataset):
        return [str(digit) for digit in range(base.num_classes)]
    classes = getattr(base, "classes", None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    class_to_idx = getattr(getattr(base, "reader", None), "class_to_idx", None)
    if isinstance(class_to_idx, dict) and sorted(class_to_idx.values()) == list(range(len(class_to_idx))):
        return [str(name) for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
    return None


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset made by :func:`make_dataset`."""
    names = class_names(dataset)
    if not names:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        raise DataError(f"cannot tell the number of classes of {type(base).__name__}")
    return len(names)


def set_model_class_names(model: nn.Module, names: list[str]) -> None:
    """Record ``names`` as what ``model``'s outputs mean, in timm's ``pretrained_cfg["label_names"]``:
    every model file written by ``icrewrite.save`` then carries them (timm's config fields), and
    ``icrewrite.load`` and ``timm.create_model("local-dir:...")`` restore them."""
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "label_names": list(names)}
    if isinstance(getattr(model, "num_classes", None), int):
        cfg["num_classes"] = model.num_classes  # timm drops label names that do not fit num_classes
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg


def model_class_names(source: nn.Module | str | os.PathLike) -> list[str] | None:
    """The class names recorded with a model or a model file written by ``icrewrite.save``
    (``finetune`` records its training data's), or None when none are recorded."""
    if isinstance(source, nn.Module):
        return model_info.class_names(source)
    from ..checkpoint import read_config

    config = read_config(source)
    return model_info.label_names(config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names"))


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
    with forked_rng("cpu", seed):
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
