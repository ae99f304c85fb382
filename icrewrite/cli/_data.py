"""The commands' data: a data set read at the model's input size and normalisation."""
from __future__ import annotations

from typing import Any

from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader

from ..train.data import DIGITS, make_loader

DIGITS_IMG_SIZES = {  # the embedded 8x8 digits, upscaled: the default size per command
    "finetune": 32,  # small and fast to train on
    "stats": 64,  # leaves 2x2 positions per image at a ResNet's last stage (docs/independence.md)
}


def loader_workers(data: str, workers: int | None) -> int:
    """``--workers``, else 0 for the embedded digits (already in memory) and 4 for image files."""
    return workers if workers is not None else (0 if data == DIGITS else 4)


def model_img_size(model: nn.Module, data: str, img_size: int | None = None, digits_img_size: int | None = None
                   ) -> int:
    """``img_size``, else ``digits_img_size`` for the digits, else the model's input size."""
    if img_size is not None:
        return img_size
    if data == DIGITS and digits_img_size:
        return digits_img_size
    return resolve_model_data_config(model)["input_size"][-1]


def model_loader(model: nn.Module, data: str, split: str, batch_size: int, *, img_size: int | None = None,
                 digits_img_size: int | None = None, **options: Any) -> DataLoader:
    """A loader of ``split`` of ``data`` normalised as ``model`` expects (timm's data config), at
    ``img_size``, else ``digits_img_size`` for the digits, else the model's input size.
    ``options`` go to ``icrewrite.train.data.make_loader`` (augment, num_workers, seed, ...)."""
    config = resolve_model_data_config(model)
    img_size = model_img_size(model, data, img_size, digits_img_size)
    return make_loader(data, split, batch_size, img_size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                       **options)
