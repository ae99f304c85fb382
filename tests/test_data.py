"""The embedded digits set, ImageFolder/timm specs, and the resumable sampling order."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset

from icrewrite.train.data import (DataError, DigitsDataset, EpochSampler, SeededDataset, class_names, digits_loaders,
                                  folder_classes, make_dataset, make_loader, num_classes, read_image, resumable_loader)


def write_digits_folder(root: Path, per_class: int = 6, classes: int = 3) -> Path:
    """An ImageFolder of real digit images: ``root/<digit>/<n>.png``, 8x8 upscaled to 24x24."""
    digits = load_digits()
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(digits.images[digits.target == label][:per_class]):
            pixels = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((24, 24)).convert("RGB").save(folder / f"{n}.png")
    return root


def test_digits_split_is_fixed_disjoint_and_complete() -> None:
    train, test = DigitsDataset("train", 16), DigitsDataset("test", 16)
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    # Fixed: a second construction yields the same images in the same order.
    assert torch.equal(DigitsDataset("train", 16).images, train.images)
    # Disjoint and complete: every original image appears exactly once across the two splits.
    rows = {tuple(img.flatten().tolist()) for img in torch.cat([train.images, test.images])}
    assert len(rows) == len({tuple(img.flatten()) for img in load_digits().images})
    # Stratified: each class keeps its share in the test split.
    counts = torch.bincount(test.targets, minlength=10)
    assert counts.min() >= 30


def test_digits_samples_are_normalised_3_channel_images() -> None:
    train = DigitsDataset("train", 32)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and 0 <= label < 10
    assert torch.equal(image[0], image[2])
    assert train.images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.images.std().item() == pytest.approx(1.0, abs=1e-4)


def test_digits_loaders_give_batches_of_the_asked_shape() -> None:
    train, test = digits_loaders(batch_size=50, img_size=16)
    images, labels = next(iter(train))
    assert images.shape == (50, 3, 16, 16) and labels.shape == (50,)
    assert train.drop_last and not test.drop_last
    assert sum(len(y) for _, y in test) == len(test.dataset)
    assert num_classes(train.dataset) == 10


def test_folder_without_splits_is_held_out(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "imgs", per_class=10, classes=3)
    train = make_dataset(str(root), "train", img_size=16)
    val = make_dataset(str(root), "validation", img_size=16)
    assert len(train) + len(val) == 30 and len(val) == 6
    assert set(train.indices).isdisjoint(val.indices)
    assert num_classes(train) == 3
    image, label = val[0]
    assert image.shape == (3, 16, 16) and label in (0, 1, 2)


def test_folder_with_split_folders_uses_them(tmp_path: Path) -> None:
    write_digits_folder(tmp_path / "train", per_class=4, classes=2)
    write_digits_folder(tmp_path / "val", per_class=2, classes=2)
    assert len(make_dataset(str(tmp_path), "train")) == 8
    loader = make_loader(str(tmp_path), "val", batch_size=4, img_size=16)
    assert len(loader.dataset) == 4 and not loader.drop_last


@pytest.mark.parametrize("spec", ["no-such-dir", "torch/cifar10:/no/such/root", "EMPTY"])
def test_unknown_data_is_a_user_error(spec: str, tmp_path: Path) -> None:
    with pytest.raises(DataError):
        make_dataset(str(tmp_path) if spec == "EMPTY" else spec, "train")


def test_unknown_split_is_a_user_error() -> None:
    with pytest.raises(DataError, match="unknown split"):
        make_dataset("digits", "holdout")


def test_epoch_sampler_order_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochSampler(20, shuffle=True, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    again = EpochSampler(20, shuffle=True, seed=3)
    again.set_epoch(1)
    assert list(again) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    assert sorted(index for _, index in first) == list(range(20))
    assert {epoch for epoch, _ in first} == {1}


def test_epoch_sampler_skip_resumes_mid_epoch() -> None:
    sampler = EpochSampler(20, shuffle=True, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=7)
    assert list(sampler) == full[7:] and len(sampler) == 13


@pytest.mark.parametrize("even", [True, False])
def test_epoch_sampler_shards_partition_the_data(even: bool) -> None:
    shards = [EpochSampler(11, shuffle=True, seed=1, rank=r, world_size=3, even=even) for r in range(3)]
    indices = [[i for _, i in shard] for shard in shards]
    flat = [i for shard in indices for i in shard]
    assert len(flat) == len(set(flat))
    assert [len(s) for s in shards] == [len(i) for i in indices]
    if even:
        assert {len(i) for i in indices} == {3}
    else:
        assert sorted(flat) == list(range(11))


class RandomCrops(Dataset):
    """A dataset whose samples draw from every global RNG, as random augmentations do."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        noise = torch.rand(2) + random.random() + np.random.rand()
        return noise + index, index % 3


def test_seeded_dataset_fixes_each_sample_and_restores_global_rng() -> None:
    data = SeededDataset(RandomCrops(), seed=5)
    torch.manual_seed(1)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    first = data[(0, 3)][0]
    data[(0, 4)]
    assert torch.equal(data[(0, 3)][0], first)
    assert not torch.equal(data[(1, 3)][0], first)
    assert torch.equal(torch.rand(1), expected_next)


def test_resumable_loader_does_not_depend_on_workers_or_resume_point() -> None:
    def batches(workers: int, skip_batches: int = 0) -> list[torch.Tensor]:
        loader = resumable_loader(DataLoader(RandomCrops(), batch_size=4, num_workers=workers), shuffle=True, seed=0)
        loader.sampler.set_epoch(2, skip=skip_batches * 4)
        return [x for x, _ in loader]

    reference = batches(workers=0)
    assert len(reference) == 3
    for got in (batches(workers=2), [*reference[:1], *batches(workers=2, skip_batches=1)]):
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


# --- one class index, from the training split -------------------------------------------------------------------


def _write_image(path: Path, rgb: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def _write_split(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<n>.png`` plain-colour images; ``classes`` maps class name -> image count."""
    for label, (name, count) in enumerate(classes.items()):
        for n in range(count):
            _write_image(root / name / f"{n}.png", (40 * label, 10 * n, 255 - 40 * label))
    return root


def test_hidden_entries_are_not_classes_or_samples(tmp_path: Path) -> None:
    root = _write_split(tmp_path / "train", {"ant": 2, "cat": 2, "dog": 2})
    _write_image(tmp_path / "train" / ".hidden_class" / "0.png", (1, 2, 3))
    _write_image(tmp_path / "train" / ".ipynb_checkpoints" / "0.png", (1, 2, 3))
    _write_image(tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png", (1, 2, 3))
    (root / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork, not a PNG
    _write_split(tmp_path / "val", {"ant": 1, "cat": 1, "dog": 1})
    train = make_dataset(str(tmp_path), "train", img_size=8)
    assert class_names(train) == ["ant", "cat", "dog"]
    assert len(train) == 6 and sorted(train.targets) == [0, 0, 1, 1, 2, 2]
    assert all(not Path(path).name.startswith(".") and ".ipynb_checkpoints" not in path for path, _ in train.samples)
    assert all(train[i][0].shape == (3, 8, 8) for i in range(len(train)))  # every sample decodes; none substituted


def test_validation_is_read_with_the_training_class_index(tmp_path: Path) -> None:
    _write_split(tmp_path / "train", {"ant": 2, "cat": 2, "dog": 2})
    _write_split(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.warns(UserWarning, match=r"no images of 1 of the 3 training classes \(ant\)"):
        val = make_dataset(str(tmp_path), "val", img_size=8)
    assert class_names(val) == ["ant", "cat", "dog"] and num_classes(val) == 3
    assert {Path(path).parent.name: target for path, target in val.samples} == {"cat": 1, "dog": 2}


def test_a_class_only_in_validation_is_refused_by_name(tmp_path: Path) -> None:
    _write_split(tmp_path / "train", {"cat": 1, "dog": 1})
    _write_split(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(DataError, match=r"class folder\(s\) emu that .*train has not") as error:
        make_dataset(str(tmp_path), "val")
    assert "\n" not in str(error.value)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    pixels = np.asarray(read_image(str(tmp_path / "g16.png")))
    assert pixels.shape == (8, 8, 3) and (pixels == 255).mean() < 0.05  # convert("RGB") alone makes 98% of them 255
    np.testing.assert_allclose(pixels[..., 0], ramp / 257, atol=0.5)
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "f.tiff")
    np.testing.assert_allclose(np.asarray(read_image(str(tmp_path / "f.tiff")))[..., 1], ramp / 257, atol=0.5)
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "wide.tiff")  # floats in 0..65535: no known scale
    with pytest.raises(DataError, match=r"wide.tiff: F image with values in \[0.0, 65535.0\]"):
        read_image(str(tmp_path / "wide.tiff"))


def test_hold_out_with_more_classes_than_held_out_images(tmp_path: Path) -> None:
    root = _write_split(tmp_path / "many", {f"c{k:02d}": 2 for k in range(30)})  # 60 images: 12 held out
    with pytest.warns(UserWarning, match="30 classes in 60 images"):
        train = make_dataset(str(root), "train", img_size=8)
    with pytest.warns(UserWarning):
        val = make_dataset(str(root), "val", img_size=8)
    assert len(train) == 48 and len(val) == 12 and set(train.indices).isdisjoint(val.indices)
    assert class_names(train) == class_names(val) == [f"c{k:02d}" for k in range(30)]
    _write_split(tmp_path / "one", {"a": 1})
    with pytest.raises(DataError, match="1 image\\(s\\) cannot be split"):
        make_dataset(str(tmp_path / "one"), "train")


def test_a_folder_where_no_image_decodes_is_one_error_line(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*x.png") as error:
        make_dataset(str(tmp_path), "train")
    assert "\n" not in str(error.value)


@given(names=st.lists(st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6), min_size=1, max_size=6, unique=True),
       hidden=st.lists(st.sampled_from([".hidden", ".ipynb_checkpoints", ".git", "._a"]), max_size=3, unique=True))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_folder_classes_are_the_sorted_visible_folders(tmp_path_factory: pytest.TempPathFactory, names: list[str],
                                                       hidden: list[str]) -> None:
    root = tmp_path_factory.mktemp("classes")
    for name in [*names, *hidden]:
        (root / name).mkdir()
    (root / "file.png").write_bytes(b"")  # a file at the top is no class
    assert folder_classes(root) == sorted(names)
