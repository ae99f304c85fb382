"""What icrewrite reads about a model from timm's metadata, one rule for each fact.

timm models carry a ``pretrained_cfg`` (architecture, input size, classifier); other
models fall back to their class name, no recorded input size, and no classifier.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["architecture", "timm_architecture", "input_size", "classifier_names", "class_names", "label_names",
           "DEFAULT_INPUT_SIZE"]

DEFAULT_INPUT_SIZE = (3, 224, 224)  # timm's default, for models that record none


def _cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg if isinstance(cfg, dict) else {}


def timm_architecture(model: nn.Module) -> str | None:
    """The timm architecture name (``pretrained_cfg["architecture"]``), None for other models."""
    return _cfg(model).get("architecture") or None


def architecture(model: nn.Module) -> str:
    """The timm architecture name, else the class name: how messages and plans name a model."""
    return timm_architecture(model) or type(model).__name__


def _required_image_size(model: nn.Module) -> tuple[int, int] | None:
    """``(H, W)`` that the model's patch embedding insists on (timm's ``PatchEmbed`` with
    ``strict_img_size``), or None when it takes any size."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", False) or getattr(embed, "dynamic_img_pad", False):
        return None
    return int(size[0]), int(size[1])


def input_size(model: nn.Module, given: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """``(C, H, W)``: ``given`` when given, else the model's ``pretrained_cfg["input_size"]``,
    else None (the caller decides: a meta probe takes :data:`DEFAULT_INPUT_SIZE`, an export asks).
    A ViT built with another ``img_size`` than its config's takes that size (timm < 1.0.31 leaves
    the config's ``input_size`` as registered, which its strict patch embedding then refuses)."""
    size = given if given is not None else _cfg(model).get("input_size")
    if size is None:
        return None
    size = tuple(int(d) for d in size)
    required = _required_image_size(model) if given is None else None
    return (size[0], *required) if required is not None and len(size) == 3 else size


def classifier_names(model: nn.Module) -> set[str]:
    """Module names of the classifier, from ``pretrained_cfg["classifier"]`` and timm's ``get_classifier``."""
    names: set[str] = set()
    classifier = _cfg(model).get("classifier")  # a name or a list of names; a config read from a file may hold anything
    names.update([classifier] if isinstance(classifier, str) else
                 [c for c in classifier if isinstance(c, str)] if isinstance(classifier, (list, tuple)) else [])
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # some timm models raise when they have no head
            head = None
        names.update(n for n, m in model.named_modules() if head is not None and m is head)
    return {n for n in names if n}


def label_names(names: Any) -> list[str] | None:
    """Class names as timm's config records them (``label_names``: a list, or ``{index: name}``), in
    class-index order; None when there are none."""
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)] if names else None
    return [str(name) for name in names] if names else None


def class_names(model: nn.Module) -> list[str] | None:
    """What the model's outputs mean, ``pretrained_cfg["label_names"]`` (``finetune`` records its
    data's class names there), else None."""
    return label_names(_cfg(model).get("label_names"))
