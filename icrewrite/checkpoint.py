"""Checkpoints: read users' weights safely, save converted models, rebuild them from the file.

Reading goes through timm's own ``load_state_dict`` (``.safetensors``, ``.pth``,
``.pth.tar``, ``.bin``; plain or nested under ``state_dict_ema``/``model_ema``/
``state_dict``/``model``, EMA weights preferred as timm does; DDP and ``torch.compile``
prefixes removed) with ``torch.load(weights_only=True)``: a pickle that needs anything but
tensors is refused before any of its code runs, unless the caller opts into
``unsafe_pickle``.

``save`` writes ``.safetensors`` whose metadata holds timm's ``config.json`` (architecture,
``model_args``, ``pretrained_cfg``) plus an ``icrewrite`` section (version, conversion
options, the plan the model was converted by, parity summary, and a probe: the model's
output on a seeded input), so ``load`` rebuilds the converted model from the file alone, by
replaying that plan on the architecture (files written before plans were recorded hold only
the options, and are converted with them again). A folder gets the Hugging Face/timm
layout, ``config.json`` + ``model.safetensors``; ``timm.create_model("local-dir:FOLDER")``
reads that config and builds the unconverted architecture.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

from . import __version__, model_info
from .compat import create_model, load_state_dict, model_args_recorded, parse_model_name, save_config_for_hf
from .errors import CheckpointError, ConversionError, ICRewriteError, few, shortened
from .files import atomic_folder, atomic_path
from .files import refuse_overwrite as _refuse_overwrite  # save's outputs: check_writable
from .rewrite import Options, Plan, Report, convert, eval_mode, options_of, output_tensors, replay
from .rewrite._edits import Reader
from .rewrite._inputs import check_model_usable

__all__ = [
    "read_state_dict",
    "fit_state_dict",
    "create_timm_model",
    "load_model",
    "save",
    "check_saveable",
    "load",
    "read_config",
    "read_checkpoint_config",
    "CheckpointConfig",
    "check",
    "example_input",
    "check_writable",
]

WEIGHTS_NAME = "model.safetensors"  # file names of the Hugging Face/timm folder layout
CONFIG_NAME = "config.json"
_METADATA_KEY = "icrewrite_config"  # safetensors metadata entry holding the config as JSON
_PROBE_VALUES = 64  # output values a checkpoint records to check that it reproduces its model
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".tar", ".bin", ".pt", ".ckpt")


# --- reading weights -----------------------------------------------------------------


def _read_error(path: Path, err: BaseException, unsafe_pickle: bool) -> CheckpointError:
    """The one-line error for a file that ``torch.load``/safetensors could not read.

    The weights-only unpickler has already refused the file whatever this says; torch's
    message only tells a pickle that would import code (``GLOBAL module.name``) from one
    it cannot parse.
    """
    rejected = next((c for c in (err, err.__cause__) if isinstance(c, pickle.UnpicklingError)), None)
    if rejected is not None and not unsafe_pickle:
        blocked = re.findall(r"GLOBAL ([\w.]+)", str(rejected))
        if blocked:
            return CheckpointError(
                f"{path}: refused to unpickle: the file would import {few(blocked)}, and loading it could run "
                "code; nothing from it was executed. Pass --unsafe-pickle (unsafe_pickle=True) only for a file "
                "you trust")
        return CheckpointError(
            f"{path}: not a tensor-only checkpoint: torch's weights-only unpickler rejected it; it is corrupt, or a "
            "pickle of Python objects (--unsafe-pickle loads those; only for a file you trust)")
    detail = str(err).strip().split(". ")[0].splitlines()[0][:160] if str(err).strip() else ""
    kind = type(err).__name__
    return CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({kind}{': ' if detail else ''}"
                           f"{detail})")


def _restore_shared(path: Path, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Add back the tied-weight names that ``safetensors.torch.save_model`` dropped.

    It stores each dropped name in the metadata, mapped to the name of the tensor kept.
    """
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    aliases = {name: state_dict[kept] for name, kept in metadata.items() if kept in state_dict}
    return {**state_dict, **aliases}


def read_state_dict(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, on the CPU, with DDP/compile prefixes removed.

    ``torch.load`` runs with ``weights_only=True`` unless ``unsafe_pickle=True`` (which
    warns: unpickling a file can execute any code in it). Unreadable, unsafe or
    non-state-dict files raise ``CheckpointError`` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if unsafe_pickle:
        warnings.warn(f"unsafe pickle: loading {path} with weights_only=False runs any code the file contains; "
                      "use this only for files you trust", stacklevel=2)
    try:  # an untrusted file can fail in any way; each failure becomes one clear message
        state_dict = load_state_dict(str(path), use_ema=True, weights_only=not unsafe_pickle)
        if path.suffix == ".safetensors":
            state_dict = _restore_shared(path, state_dict)
    except Exception as err:
        raise _read_error(path, err, unsafe_pickle) from err
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"{path}: holds no state dict (found {type(state_dict).__name__})")
    others = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{path}: holds no state dict: {len(others)} entries are not tensors "
                              f"({few(others)}); expected tensors, or one of the keys state_dict, model, "
                              "state_dict_ema, model_ema")
    return dict(state_dict)


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, or explain in one line why it does not fit.

    The message names missing and unexpected keys and shape mismatches (a few of each),
    says when the file looks like another architecture, and when only the classifier
    differs, which ``num_classes`` would fit.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict)
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if mismatched:
        shapes = [f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}" for k in mismatched]
        problems.append(f"{len(mismatched)} shape mismatches ({few(shapes)})")
    message = f"{source} does not fit {model_info.architecture(model)}: " + "; ".join(problems)
    matching = len(expected) - len(missing) - len(mismatched)
    if matching < len(expected) / 2:
        message += f"; only {matching} of {len(expected)} tensors match: a checkpoint for another architecture?"
    heads = tuple(f"{name}." for name in model_info.classifier_names(model))
    if heads and mismatched and not (missing or unexpected) and all(k.startswith(heads) for k in mismatched):
        classes = state_dict[mismatched[0]].shape[0]
        message += f"; only the classifier differs: the file has {classes} classes (--num-classes {classes})"
    raise CheckpointError(message)


# --- making models -------------------------------------------------------------------


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with one-line errors; unknown names get suggestions."""
    try:
        source, model_id = parse_model_name(name)
    except ValueError as err:
        raise CheckpointError(f"{shortened(name, 80)}: no such file or folder, and not a timm model name ({err})"
                              ) from err
    if source is None:
        architecture = split_model_name_tag(model_id)[0]
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise CheckpointError(f"unknown timm model {shortened(architecture, 80)!r}{hint}")
    try:  # model constructors reject bad arguments and unreachable weights in many ways
        return create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError, OSError, AssertionError) as err:
        raise CheckpointError(f"cannot create {shortened(name, 80)}: {' '.join(str(err).split())[:200]}") from err


def _local_path(source: str | os.PathLike) -> Path | None:
    """The existing file or folder that ``source`` names (a path or ``local-dir:PATH``), else None."""
    text = os.fspath(source)
    path = Path(text.removeprefix("local-dir:"))
    try:
        return path if path.exists() else None
    except OSError as err:  # a name longer than the file system allows, a path through a file
        raise CheckpointError(f"{shortened(text, 80)}: not a file or folder ({err.strerror}), and not a timm model "
                              "name") from err


def load_model(
    source: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    unsafe_pickle: bool = False,
    **create_kwargs: Any,
) -> nn.Module:
    """The model a user names: a file or folder written by ``save`` (rebuilt converted), a
    timm/Hugging Face folder (its weights loaded), or any name ``timm.create_model``
    accepts (``create_kwargs`` such as ``num_classes`` or ``pretrained`` go to it).

    ``checkpoint`` is a weights file in any timm format, loaded strictly on top.
    """
    path = _local_path(source)
    if path is None and Path(source).suffix in _WEIGHT_SUFFIXES:
        raise CheckpointError(f"{source}: no such file")
    config = _config_or_none(path) if path is not None else None
    if config is not None:
        if create_kwargs:
            raise CheckpointError(f"{source} is an icrewrite checkpoint, rebuilt from its own config: "
                                  f"{', '.join(create_kwargs)} cannot be changed")
        model = load(path)
    elif path is not None and path.is_file():
        raise CheckpointError(f"{source} is a weights file without an architecture: name the timm model and pass "
                              f"the file as the checkpoint, e.g. `icrewrite convert resnet50 --checkpoint {source}`")
    elif path is not None:
        model = create_timm_model(f"local-dir:{path}", **{"pretrained": True, **create_kwargs})
    else:
        model = create_timm_model(os.fspath(source), **create_kwargs)
    if checkpoint is not None:
        fit_state_dict(model, read_state_dict(checkpoint, unsafe_pickle=unsafe_pickle), source=os.fspath(checkpoint))
    return model


# --- saving and rebuilding -----------------------------------------------------------


def _seeded_batch(shape: list[int], seed: int, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def example_input(model: nn.Module, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch at the model's input size (:func:`icrewrite.model_info.input_size`)."""
    input_size = list(model_info.input_size(model) or model_info.DEFAULT_INPUT_SIZE)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _seeded_batch([batch_size, *input_size], seed, device)


@torch.no_grad()
def _probe(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Evenly spaced values of the eval-mode output on ``x``: a fingerprint of the function."""
    with eval_mode(model):
        flat = torch.cat([t.float().flatten() for t in output_tensors(model(x))]).cpu()
    index = torch.linspace(0, flat.numel() - 1, min(_PROBE_VALUES, flat.numel())).long()
    return flat[index].tolist()


def _timm_config(model: nn.Module, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's ``config.json`` for ``model`` (timm only writes it to a file, so read that back)."""
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise CheckpointError(f"cannot save {type(model).__name__}: only models made by timm.create_model can be "
                              "rebuilt from a file (they record their architecture and arguments)")
    with tempfile.TemporaryDirectory() as folder:
        try:
            save_config_for_hf(model, Path(folder) / CONFIG_NAME, model_args=model_args)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"cannot save {model_info.architecture(model)}: {err}") from err
        return json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8"))


# --- the config a checkpoint records, parsed -----------------------------------------------

_MAX_INT = 1_000_000  # largest integer a recorded builder argument may hold (classes, widths, image sizes)
_MAX_PROBE_SIZE = 4096  # largest side of the recorded probe input
_MAX_PROBE_VALUES = 3 * 1024 * 1024  # values in the probe input
_JSON_DEPTH = 8
_NOT_FROM_FILES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                   "pretrained_strict", "features_only", "scriptable", "exportable", "no_jit")  # where weights come from
_SECTION_KEYS = ("version", "options", "plan", "parity", "probe")
_REPORT_EXTRAS = ("param_delta", "param_delta_pct", "ok")  # what Report.to_dict() adds to its fields


@dataclass(frozen=True)
class Probe:
    """The model's eval output recorded at save time on a seeded standard-normal input."""

    input_size: tuple[int, ...]
    seed: int
    values: tuple[float, ...]


@dataclass(frozen=True)
class CheckpointConfig:
    """What a file written by ``save`` records, parsed into typed values and checked before
    anything is built (``CheckpointConfig.from_dict``): a file is data, and a field of the
    wrong type, out of range or unknown is one ``CheckpointError`` naming it."""

    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any] | None
    version: str
    options: Options | None
    plan: Plan | None
    parity: Report | None
    probe: Probe | None  # None only in a config about to be written (``with_probe=False``)

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike, *, with_probe: bool = True) -> CheckpointConfig:
        """The typed config; ``with_probe=False`` reads one that ``save`` has not yet given its probe."""
        top = _Fields(data, "config", source)
        section = _Fields(top.get("icrewrite", dict), "icrewrite", source, allowed=_SECTION_KEYS)
        architecture = top.get("architecture", str)
        if ":" in architecture or not timm.is_model(split_model_name_tag(architecture)[0]):
            raise top.error(f"{architecture!r} is not an architecture of this timm ({timm.__version__})",
                            "architecture")
        model_args = top.get("model_args", dict, default={})
        for key, value in model_args.items():
            if not key.isidentifier() or key in _NOT_FROM_FILES:
                raise top.error(f"{key!r} cannot be recorded (builder arguments are names of the architecture's "
                                "own options; where weights come from is not read from a file)", "model_args")
            top.check_value(value, f"model_args.{key}")
        pretrained_cfg = top.get("pretrained_cfg", dict, type(None), default=None)
        if pretrained_cfg is not None:
            for key, value in pretrained_cfg.items():
                top.check_value(value, f"pretrained_cfg.{repr(key)[1:-1]}")
            if "input_size" in pretrained_cfg:
                top.check_sizes(pretrained_cfg["input_size"], "pretrained_cfg.input_size", length=(3,))
        options = section.get("options", dict, type(None))
        try:
            parsed_options = None if options is None else Options.from_dict(options, "icrewrite.options")
        except ConversionError as err:  # Options' reader speaks of plans, where options also live
            raise CheckpointError(f"{source}: {str(err).replace('malformed plan: ', 'malformed checkpoint config: ')}"
                                  ) from err
        return cls(architecture=architecture, model_args=model_args, pretrained_cfg=pretrained_cfg,
                   version=section.get("version", str), options=parsed_options,
                   plan=_recorded_plan(source, section.get("plan", dict, type(None), default=None)),
                   parity=_parity(section), probe=_probe_record(section) if with_probe else None)

    def to_timm(self) -> dict[str, Any]:
        """``timm.create_model`` keyword arguments that build the architecture, without weights."""
        return {"pretrained": False, "pretrained_cfg_overlay": self.pretrained_cfg, **self.model_args}


class _Fields(Reader):
    """Typed access to a JSON object read from a file (a plan ``Reader`` whose problems are each
    one ``CheckpointError`` naming the file and the field)."""

    def __init__(self, data: Any, where: str, source: str | os.PathLike, allowed: tuple[str, ...] | None = None
                 ) -> None:
        self.where, self.source = where, source
        if not isinstance(data, dict):
            raise self.error(f"expected an object, got {type(data).__name__}")
        unknown = [str(k) for k in data if allowed is not None and k not in allowed]
        if unknown:
            raise self.error(f"unknown {few(unknown)} (known: {', '.join(allowed or ())})")
        self.data = data

    def error(self, message: str, key: str | None = None) -> CheckpointError:
        where = f"{self.where}.{key}" if key and self.where != "config" else (key or self.where)
        return CheckpointError(f"{self.source}: malformed checkpoint config: {where}: {message}")

    def check_value(self, value: Any, key: str, depth: int = 0) -> None:
        """A JSON value of bounded depth whose integers are within ``_MAX_INT`` and numbers finite."""
        if depth > _JSON_DEPTH:
            raise self.error("nested too deeply", key)
        if isinstance(value, dict):
            for k, v in value.items():  # a key as JSON could spell it, so the message stays one line
                self.check_value(v, f"{key}.{repr(k)[1:-1]}", depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.check_value(v, f"{key}[{i}]", depth + 1)
        elif type(value) is int and abs(value) > _MAX_INT:
            raise self.error(f"{value} is out of range (at most {_MAX_INT:,})", key)
        elif type(value) is float and not math.isfinite(value):
            raise self.error(f"{value} is not a finite number", key)
        elif type(value) not in (str, int, float, bool, type(None)):
            raise self.error(f"unexpected {type(value).__name__}", key)

    def check_sizes(self, value: Any, key: str, length: tuple[int, ...] = (1, 2, 3, 4)) -> tuple[int, ...]:
        """A list of ``length`` positive integers, each at most ``_MAX_PROBE_SIZE``."""
        if (type(value) is not list or len(value) not in length
                or not all(type(v) is int and 0 < v <= _MAX_PROBE_SIZE for v in value)):
            raise self.error(f"expected {' or '.join(map(str, length))} sizes between 1 and {_MAX_PROBE_SIZE}, got "
                             f"{str(value)[:60]}", key)
        return tuple(value)


def _probe_record(section: _Fields) -> Probe:
    probe = _Fields(section.get("probe", dict), "icrewrite.probe", section.source,
                    allowed=("input_size", "seed", "values"))
    input_size = probe.check_sizes(probe.get("input_size", list), "input_size")
    if math.prod(input_size) > _MAX_PROBE_VALUES:
        raise probe.error(f"{list(input_size)} is larger than any model input checked ({_MAX_PROBE_VALUES:,} "
                          "values)", "input_size")
    seed = probe.get("seed", int)
    if not 0 <= seed < 2**63:
        raise probe.error(f"{seed} is not a seed (0 <= seed < 2**63)", "seed")
    values = probe.get("values", list)
    if not 0 < len(values) <= _PROBE_VALUES or not all(type(v) in (int, float) for v in values):
        raise probe.error(f"expected 1 to {_PROBE_VALUES} numbers", "values")
    return Probe(input_size, seed, tuple(float(v) for v in values))


def _parity(section: _Fields) -> Report | None:
    data = section.get("parity", dict, type(None), default=None)
    if data is None:
        return None
    names = [f.name for f in dataclasses.fields(Report)]
    parity = _Fields(data, "icrewrite.parity", section.source, allowed=(*names, *_REPORT_EXTRAS))
    counts = {key: parity.get(key, int) for key in ("params_before", "params_after")}
    changes = parity.get("changes", dict)
    if not all(type(v) is int for v in changes.values()):
        raise parity.error("expected module names mapped to integers", "changes")
    errors = {key: parity.get(key, float, int, type(None), default=None) for key in ("max_abs_error", "max_rel_error")}
    return Report(**counts, changes=changes, **{k: None if v is None else float(v) for k, v in errors.items()},
                  non_finite=parity.get("non_finite", str, type(None), default=None))


def _failure(err: BaseException) -> str:
    text = " ".join(str(err).split())[:120]
    return f"{type(err).__name__}{': ' if text else ''}{text}"


def _rebuild(config: CheckpointConfig, source: str | os.PathLike, *, on_meta: bool = False) -> nn.Module:
    """The architecture ``config`` describes (weights as built), converted as recorded: its plan
    replayed, with no tracing or analysis, or, for a file written before plans were recorded,
    converted with its options. Every failure is a ``CheckpointError`` naming ``source``: the
    builder arguments and the plan are the file's (``on_meta``: failures other than
    ``ICRewriteError`` pass through, as builders that read tensor values fail on meta)."""
    try:
        model = create_timm_model(config.architecture, **config.to_timm())
    except ICRewriteError as err:
        if on_meta and err.__cause__ is not None and not isinstance(err.__cause__, ICRewriteError):
            raise err.__cause__ from None  # the builder failed on meta (it reads tensor values): the real build decides
        raise CheckpointError(f"{source}: {err}") from err
    except Exception as err:  # recorded arguments can fail a builder in any way
        if on_meta:
            raise
        raise CheckpointError(f"{source}: cannot build {config.architecture} with the recorded model_args "
                              f"({_failure(err)})") from err
    try:
        if config.plan is not None:
            return replay(model, config.plan, inplace=True)
        return model if config.options is None else convert(model, inplace=True, **config.options.to_dict())
    except ICRewriteError as err:
        raise CheckpointError(f"{source}: {err}") from err
    except Exception as err:  # a plan that replay's checks let through, on a model the file's arguments built
        if on_meta:
            raise
        raise CheckpointError(f"{source}: cannot convert {config.architecture} as the file records "
                              f"({_failure(err)})") from err


def _check_rebuilds(model: nn.Module, config: dict[str, Any]) -> None:
    """Refuse to write a config that ``load`` would rebuild into another architecture.

    Only needed for a model without recorded constructor arguments (built by
    ``timm.create_model`` of timm <= 1.0.30, see ``compat.model_args_recorded``): its config
    holds only the arguments the model shows. The architecture is rebuilt on ``meta``
    (on the CPU for builders that need real tensors) and its state-dict layout compared.
    """
    try:
        parsed = CheckpointConfig.from_dict(config, "the config to save", with_probe=False)
        try:
            with torch.device("meta"):
                expected = _rebuild(parsed, "the config to save").state_dict()
        except Exception:  # builders that need real tensors (.item(), .tolist()); a real failure recurs on the CPU
            expected = _rebuild(parsed, "the config to save").state_dict()
    except (CheckpointError, ConversionError) as err:  # the recorded plan does not fit what the config builds
        problem = str(err)
    else:
        actual = model.state_dict()
        missing = [k for k in expected if k not in actual]
        unexpected = [k for k in actual if k not in expected]
        shapes = [f"{k}: model {tuple(actual[k].shape)}, rebuilt {tuple(expected[k].shape)}"
                  for k in actual if k in expected and actual[k].shape != expected[k].shape]
        if not (missing or unexpected or shapes):
            return
        problem = "; ".join(f"{len(items)} {what} ({few(items)})" for what, items in
                            (("keys missing", missing), ("extra keys", unexpected), ("shape mismatches", shapes))
                            if items)
    raise CheckpointError(
        f"cannot save {model_info.architecture(model)}: its config would rebuild another architecture ({problem}). This timm "
        f"({timm.__version__}; before 1.0.31) does not record the arguments timm.create_model was given: pass them "
        "as save(..., model_args={...}), or build the model with icrewrite.load_model(name, **kwargs), which "
        "records them")


def _rebuild_config(model: nn.Module, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``load`` rebuilds ``model`` from: timm's config and how the model was converted.
    Raises ``CheckpointError`` for a model that no file could rebuild (see :func:`_check_rebuilds`)."""
    config = _timm_config(model, model_args)
    config["icrewrite"] = {"version": __version__, "options": options_of(model),
                           "plan": getattr(model, "icrewrite_plan", None)}
    if not model_args_recorded(model):
        _check_rebuilds(model, config)
    return config


def check_saveable(model: nn.Module, model_args: Mapping[str, Any] | None = None) -> None:
    """Raise the ``CheckpointError`` that ``save(model, ..., model_args=model_args)`` would raise,
    without writing anything: work that saves its result (``finetune``) is refused before it starts."""
    _rebuild_config(model, model_args)


def _config(model: nn.Module, parity: Report | None, model_args: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
    config = _rebuild_config(model, model_args)
    x = example_input(model, batch_size=1)
    config["icrewrite"].update(parity=None if parity is None else parity.to_dict(),
                               probe={"input_size": list(x.shape[1:]), "seed": 0, "values": _probe(model, x)})
    return config


def _is_folder(path: Path) -> bool:
    """Whether ``save`` writes ``path`` as a folder (the Hugging Face/timm layout) or one file."""
    return path.suffix != ".safetensors"


def check_writable(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Raise the ``CheckpointError`` that writing ``save(..., path, force=force)`` would meet
    (an existing output without ``force``, a file where a folder goes, an unwritable folder,
    a name too long), before the work that produces the model; returns ``path`` as a Path."""
    path = Path(path)
    return _refuse_overwrite(path, folder=_is_folder(path), force=force, replaces=(WEIGHTS_NAME, CONFIG_NAME),
                            error=CheckpointError)


def _write_weights(model: nn.Module, path: Path, config: dict[str, Any]) -> None:
    safetensors.torch.save_model(model, str(path), metadata={"format": "pt", _METADATA_KEY: json.dumps(config)})


def save(model: nn.Module, path: str | os.PathLike, *, parity: Report | None = None, force: bool = False,
         model_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a timm model, converted or not) so that ``load(path)`` rebuilds it.

    ``path`` ending in ``.safetensors`` is one file; any other path is a folder in the
    Hugging Face/timm layout. ``parity`` (from ``icrewrite.verify``) is recorded as a
    summary. The output is written under a temporary sibling name and published by one
    rename (``icrewrite.files``): a kill leaves the old output or the new one, and of two
    concurrent writers one succeeds and the other is refused; an existing output is only
    replaced with ``force=True``. Tied weights are stored once (``safetensors.torch.save_model``).

    The config records the arguments the model was built with (``model_args``), for ``load``
    to rebuild it. timm >= 1.0.31 records them in ``timm.create_model``, and ``load_model``
    records them on every timm; for a model that ``timm.create_model`` of an older timm built,
    only what the model shows (``num_classes``, ``in_chans``, ``global_pool``) is known: give
    the others as ``model_args`` (a config that would rebuild another architecture is refused).
    """
    path = check_writable(path, force=force)
    check_model_usable(model, "save")
    config = _config(model, parity, model_args)
    if not _is_folder(path):
        with atomic_path(path, force=force, error=CheckpointError) as tmp:
            _write_weights(model, tmp, config)
        return path
    with atomic_folder(path, force=force, replaces=(WEIGHTS_NAME, CONFIG_NAME), error=CheckpointError) as tmp:
        _write_weights(model, tmp / WEIGHTS_NAME, config)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def _config_or_none(path: Path) -> dict[str, Any] | None:
    """The icrewrite config of a file or folder, None if it was not written by ``save``."""
    file = path / CONFIG_NAME if path.is_dir() else path
    try:
        if path.is_dir():
            config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        elif path.suffix == ".safetensors":
            with safetensors.safe_open(str(file), "pt") as f:
                config = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
        else:
            return None
    except (OSError, ValueError, RecursionError, safetensors.SafetensorError) as err:
        raise _read_error(file, err, unsafe_pickle=False) from err
    return config if isinstance(config, dict) and "icrewrite" in config else None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config ``save`` wrote: timm's ``config.json`` fields plus the ``icrewrite`` section."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = _config_or_none(path)
    if config is None:
        raise CheckpointError(f"{path}: not written by icrewrite (no icrewrite config); a plain weights file goes "
                              "with the timm model name: `icrewrite convert MODEL --checkpoint FILE`")
    return config


def _recorded_plan(source: str | os.PathLike, recorded: dict[str, Any] | None) -> Plan | None:
    """The plan a checkpoint records (parsed by ``Plan.from_dict``), or None when it has none
    (written before plans were recorded, or of a model that was not converted)."""
    if recorded is None:
        return None
    try:
        return Plan.from_dict(recorded)
    except ConversionError as err:
        raise CheckpointError(f"{source}: {err}") from err


def read_checkpoint_config(path: str | os.PathLike) -> CheckpointConfig:
    """The config ``save`` wrote to ``path``, parsed and checked (see ``CheckpointConfig``)."""
    return CheckpointConfig.from_dict(read_config(path), path)


def _stored_shapes(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file as meta tensors of their shapes (its header only)."""
    try:
        with safetensors.safe_open(str(weights), "pt") as f:
            stored = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            aliases = f.metadata() or {}
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise _read_error(weights, err, unsafe_pickle=False) from err
    return {**stored, **{name: stored[kept] for name, kept in aliases.items() if kept in stored}}


def _check_fits(config: CheckpointConfig, weights: Path) -> None:
    """Build the recorded architecture on the meta device and compare it with the shapes the
    weights file holds: a config that describes another or a larger model is refused before
    any memory is allocated for it (builders that need real tensors are checked after)."""
    try:
        with torch.device("meta"):
            model = _rebuild(config, weights.parent if weights.name == WEIGHTS_NAME else weights, on_meta=True)
    except ICRewriteError:
        raise
    except Exception:  # builders that read tensor values cannot run on meta; the real build checks them
        return
    fit_state_dict(model, _stored_shapes(weights), source=str(weights))


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model ``save`` wrote, in eval mode: the timm architecture from the recorded
    arguments, converted by replaying the recorded plan (no tracing or analysis; a file without
    a plan is converted with its recorded options), then the weights loaded strictly.

    The recorded config is parsed and checked first (``CheckpointConfig``), and the model it
    describes compared with the file's tensor shapes on the meta device, before it is built."""
    return _load(Path(path), read_checkpoint_config(path))


def _load(path: Path, config: CheckpointConfig) -> nn.Module:
    """:func:`load` of ``path``, whose config has been read as ``config``."""
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    _check_fits(config, weights)
    model = _rebuild(config, path)
    fit_state_dict(model, read_state_dict(weights), source=str(weights))
    return model.eval()


def check(path: str | os.PathLike) -> tuple[nn.Module, float]:
    """Rebuild ``path`` and compare its output with the probe recorded at save time.

    Returns the model and the max abs error relative to max |recorded output|; above
    ``icrewrite.verify.TOLERANCE`` the file no longer computes what was saved.
    """
    config = read_checkpoint_config(path)
    model, probe = _load(Path(path), config), config.probe
    x = _seeded_batch([1, *probe.input_size], probe.seed, next(model.parameters()).device)
    expected = torch.tensor(probe.values)
    try:
        actual = torch.tensor(_probe(model, x))
    except (RuntimeError, ValueError) as err:  # a probe input the model cannot take
        raise CheckpointError(f"{path}: the recorded probe input {list(probe.input_size)} does not fit the model "
                              f"({str(err).splitlines()[0][:120]})") from err
    if actual.shape != expected.shape:
        return model, float("inf")
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    return model, error / scale if scale > 0 else error
