"""Errors that icrewrite reports to users: one clear line, no traceback in the CLI."""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType


class ICRewriteError(Exception):
    """Base class: the message is complete and meant for the user."""


class ConversionError(ICRewriteError):
    """A model cannot be planned or converted as asked."""


class CheckpointError(ICRewriteError):
    """A checkpoint file is unsafe, corrupt or does not fit the model."""


class ExportError(ICRewriteError):
    """A model cannot be exported or the export does not verify."""


class DataError(ICRewriteError):
    """A data set cannot be found, read or used as asked."""


class TrainingError(ICRewriteError):
    """Training cannot start or continue as asked."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


class MissingExtra(ICRewriteError, ImportError):
    """An optional dependency group is not installed; the message names the pip command."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` from the optional group ``extra``, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{module.partition('.')[0]} is not installed; it comes with "
                           f"pip install 'icrewrite[{extra}]'") from err


def few(items: Sequence[str], shown: int = 3) -> str:
    """``"a, b, c and 4 more"``: a list short enough for a one-line message."""
    head = ", ".join(items[:shown])
    return f"{head} and {len(items) - shown} more" if len(items) > shown else head


def shortened(name: str, most: int) -> str:
    """``name`` elided in the middle when longer than ``most`` characters: short enough for a one-line message."""
    return name if len(name) <= most else f"{name[:most - 20]}...{name[-12:]}"
