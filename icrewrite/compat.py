"""Every name whose location or behaviour differs between the library versions icrewrite supports.

The rest of the package imports these names from here, never from the version-dependent
place, so that supporting one more version is a change to this file alone. Each entry
says which versions take which path. Paths are chosen by feature detection (does the
name import, does the function take or default the argument), not by parsing version
strings.

Sections: timm (``timm>=1.0.9``, as ``pyproject.toml`` declares), then torch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import timm.models
from timm.models import load_pretrained
from timm.models import load_state_dict as _timm_load_state_dict
from timm.models import parse_model_name as _timm_parse_model_name
from timm.models._hub import load_cfg_from_json
from timm.models._hub import save_config_for_hf as _timm_save_config_for_hf
import torch
from torch import nn

__all__ = [
    # torch
    "forked_rng",
    "is_exporting",
    "onnx_export_without_draft",
    # timm
    "register_notrace_module",
    "is_notrace_module",
    "get_notrace_functions",
    "load_state_dict",
    "parse_model_name",
    "create_model",
    "save_config_for_hf",
    "model_args_recorded",
    "TIMM_READS_LOCAL_DIR",
    "TIMM_RECORDS_MODEL_ARGS",
]

# =====================================================================================
# timm
# =====================================================================================

# --- FX leaf registry: register_notrace_module, is_notrace_module, get_notrace_functions ----
# timm >= 1.0.17: defined in ``timm.layers._fx`` and exported by ``timm.layers`` (timm's own
#   layers register themselves there with the decorator).
# timm 1.0.9 - 1.0.16: defined in ``timm.models._features_fx`` (which lists timm's leaf layers
#   itself) and exported by ``timm.models`` only; ``timm.layers`` lacks them.
# ``timm.models`` re-exports them in every version, but the layers path is the home of the
# registry where it exists. Either way it is the one registry timm's own FX feature
# extraction uses, so modules registered here are leaves for timm too.
try:
    from timm.layers import get_notrace_functions, is_notrace_module, register_notrace_module
except ImportError:  # timm < 1.0.17
    from timm.models import get_notrace_functions, is_notrace_module, register_notrace_module


# --- reading weights: load_state_dict --------------------------------------------------------
# ``timm.models.load_state_dict(path, use_ema, weights_only=...)`` takes ``weights_only`` in every
# supported version (its default is False up to 1.0.30, True from 1.0.31: always pass it).
# - timm >= 1.0.26 allowlists ``argparse.Namespace`` for ``weights_only`` loads, which timm's own
#   train.py pickles into its checkpoints (``args``); timm 1.0.9 - 1.0.25 refuses such files.
#   The allowlist is applied here on every version (nesting it is harmless).
# - timm >= 1.0.31 removes the DDP and ``torch.compile`` key prefixes in either order; timm
#   1.0.9 - 1.0.30 only ``module.`` then ``_orig_mod.``, so a compiled DDP model's keys
#   (``_orig_mod.module.``) kept a prefix. The 1.0.31 cleaning is applied again here.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # torch.compile of DDP, DDP, torch.compile


def _without_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_state_dict(path: str, *, use_ema: bool = True, weights_only: bool = True) -> Any:
    """The state dict in a timm weights file (EMA weights preferred, DDP/compile prefixes removed),
    read as timm 1.0.31 reads it, on the CPU."""
    if weights_only and hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            state_dict = _timm_load_state_dict(path, use_ema=use_ema, weights_only=True)
    else:
        state_dict = _timm_load_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    if isinstance(state_dict, Mapping) and all(isinstance(k, str) for k in state_dict):
        return _without_wrapper_prefixes(state_dict)
    return state_dict


# --- model names: parse_model_name ----------------------------------------------------------
# icrewrite relies on the contract of timm 1.0.31's ``parse_model_name``: ``(None, name)`` for
# a registry name, ``(source, id)`` for ``hf-hub:`` and ``local-dir:``, ``ValueError`` for an
# unknown prefix or for an unprefixed name that looks like a path or a Hub repo id. Older timm
# differs in three ways, each handled below where it shows:
# - timm < 1.0.16 returns the source ``"timm"`` for registry names, and knows no ``local-dir:``;
# - timm <= 1.0.30 refuses an unknown prefix with ``AssertionError``, not ``ValueError``;
# - timm <= 1.0.30 URL-parses the name and keeps a path's last component (``"a/resnet18"`` is
#   ``resnet18``, silently another model), and drops ``#...``/``?...`` from ``local-dir:`` paths.
_PATH_CHARS = ("/", "\\", ":")
_SOURCES = ("hf-hub", "local-dir")


def _timm_parses_local_dir() -> bool:
    """Whether timm's own ``parse_model_name`` accepts ``local-dir:`` (timm >= 1.0.16)."""
    try:
        return _timm_parse_model_name("local-dir:.")[0] == "local-dir"
    except (AssertionError, ValueError):
        return False


TIMM_READS_LOCAL_DIR = _timm_parses_local_dir()
"""``timm.create_model("local-dir:FOLDER")`` works: timm >= 1.0.16 (``False`` on 1.0.9 - 1.0.15)."""


def parse_model_name(name: str) -> tuple[str | None, str]:
    """``(source, model_id)`` of a model name, with timm 1.0.31's contract on every timm:
    source ``None`` for a timm registry name, ``"hf-hub"`` or ``"local-dir"`` for a prefixed
    one (the id after the prefix kept verbatim); ``ValueError`` for an unknown prefix, an
    empty id, or an unprefixed name holding ``/``, ``\\`` or ``:``."""
    prefix, sep, model_id = name.partition(":")
    if sep and prefix.lower().replace("_", "-") in _SOURCES:
        if not model_id:
            raise ValueError(f"model name {name!r} has no model id or path after the {prefix!r} prefix")
        if prefix.lower() == "local-dir":  # timm <= 1.0.30 would URL-parse the path (or refuse it, < 1.0.16)
            return "local-dir", model_id
    try:
        source, model_id = _timm_parse_model_name(name)
    except AssertionError as err:  # timm <= 1.0.30: an unknown source prefix fails an assert
        raise ValueError(f"unknown model source in {name!r}, valid sources: {', '.join(_SOURCES)}") from err
    if source == "timm":  # timm < 1.0.16 names the registry "timm"; later versions None
        source = None
    if source is None and any(c in name for c in _PATH_CHARS):  # timm <= 1.0.30 keeps the path's last part
        raise ValueError(f"model name {name!r} has no source prefix but looks like a Hugging Face Hub repo id or a "
                         f"local path; use 'hf-hub:{name}' or 'local-dir:{name}'")
    return source, model_id


# --- constructor arguments: model_args_recorded -------------------------------------------
# Rebuilding a model from its ``config.json`` needs the arguments it was built with
# (``depth=2``, ``img_size=28``: nothing in the built model says all of them).
# timm >= 1.0.31: ``timm.create_model`` keeps them in ``model._model_args`` (minus runtime
#   placement), and ``save_config_for_hf`` writes them as ``model_args``.
# timm 1.0.9 - 1.0.30: nothing records them. :func:`create_model` (icrewrite's way of making
#   models: ``load_model``, the command line) records them in the same attribute; a model that
#   ``timm.create_model`` built directly has none, and :func:`save_config_for_hf` can only add
#   what the model shows (classifier size, input channels, pooling).
TIMM_RECORDS_MODEL_ARGS = hasattr(timm.models, "get_model_args")
"""``timm.create_model`` records constructor arguments and ``save_config_for_hf`` writes them: timm >= 1.0.31."""

# ``timm.create_model``'s own options, not the model's (as timm 1.0.31 leaves them out).
_FACTORY_OPTIONS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                              "cache_dir", "scriptable", "exportable", "no_jit", "device", "dtype",
                              "pretrained_model_args"})


def model_args_recorded(model: nn.Module) -> bool:
    """Whether ``model`` carries the arguments it was built with: made by ``timm.create_model``
    on timm >= 1.0.31, or by :func:`create_model` on any timm."""
    return isinstance(getattr(model, "_model_args", None), dict)


# --- creating models, from a local folder too: create_model ---------------------------------
# ``timm.create_model("local-dir:FOLDER")`` reads ``FOLDER/config.json`` and its weights.
# timm >= 1.0.31: timm's own path, which reads the weights with ``weights_only=True``.
# timm 1.0.16 - 1.0.30: timm reads the folder, but unpickles a ``.bin``/``.pth`` there with
#   ``weights_only=False`` (running any code in it) and mangles paths holding ``#`` or ``?``;
# timm 1.0.9 - 1.0.15: no ``local-dir:`` at all.
# Where timm's path is missing or unsafe, :func:`_create_from_folder` does what timm 1.0.31
# does: the architecture, ``pretrained_cfg`` and ``model_args`` from ``config.json``, the
# weights read tensor-only and loaded by timm's own ``load_pretrained`` (classifier dropped
# when ``num_classes`` differs, as for any pretrained weights).
def _timm_folder_weights_only() -> bool:
    reader = getattr(timm.models._hub, "load_state_dict_from_path", None)
    if reader is None:
        return False
    parameter = inspect.signature(reader).parameters.get("weights_only")
    return parameter is not None and parameter.default is True


_TIMM_READS_LOCAL_DIR_SAFELY = TIMM_READS_LOCAL_DIR and _timm_folder_weights_only()

# timm's order of preference for the weights in a model folder (``timm.models._hub``).
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                   "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
_FOLDER_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin")


def _folder_weights(folder: Path) -> Path:
    for name in _FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    for suffix in _FOLDER_WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise RuntimeError(f"No suitable checkpoints found in {folder}.")


def _folder_config(folder: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(pretrained_cfg, architecture, model_args)`` of a timm model folder, as timm parses them."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"Config file not found: {config_file}")
    config = load_cfg_from_json(config_file)
    if "pretrained_cfg" not in config:  # legacy single-dict form
        pretrained_cfg = config
        config = {"architecture": pretrained_cfg.pop("architecture"), "pretrained_cfg": pretrained_cfg}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
    pretrained_cfg = dict(config["pretrained_cfg"])
    for key in ("num_classes", "label_names", "label_descriptions"):  # top-level fields override
        if key in config:
            pretrained_cfg[key] = config[key]
    known = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}  # a newer timm may have written more
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k in known}
    return pretrained_cfg, config["architecture"], dict(config.get("model_args") or {})


def _create_from_folder(folder: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    path = Path(folder)
    pretrained_cfg, architecture, model_args = _folder_config(path)
    if kwargs.pop("pretrained_cfg", None):
        raise ValueError("pretrained_cfg should not be set when sourcing model from a local folder")
    kwargs = {**model_args, **{k: v for k, v in kwargs.items() if v is not None}}
    model = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    if pretrained:
        weights = _folder_weights(path)
        try:
            state_dict = load_state_dict(str(weights), weights_only=True)
        except pickle.UnpicklingError as err:  # as timm >= 1.0.31 reports it
            raise RuntimeError(f"{weights}: weights_only=True blocked loading this checkpoint because it "
                               "requires non-allowlisted pickle globals. No automatic unsafe pickle fallback is "
                               "performed.") from err
        load_pretrained(model, pretrained_cfg={**model.pretrained_cfg, "state_dict": state_dict},
                        num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3))
    model._model_args = {k: v for k, v in kwargs.items() if k not in _FACTORY_OPTIONS}
    return model


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with ``local-dir:FOLDER`` read as timm 1.0.31
    reads it (weights tensor-only) and the constructor arguments recorded on the model
    (:func:`model_args_recorded`), on every timm version."""
    source, model_id = parse_model_name(name)
    if source == "local-dir" and not _TIMM_READS_LOCAL_DIR_SAFELY:
        model = _create_from_folder(model_id, **kwargs)
    else:
        model = timm.create_model(name, **kwargs)
    if not model_args_recorded(model):  # timm <= 1.0.30
        model._model_args = {k: v for k, v in kwargs.items() if k not in _FACTORY_OPTIONS and v is not None}
    return model


# --- config.json: save_config_for_hf --------------------------------------------------------
# A model's ``config.json`` (``timm.models._hub.save_config_for_hf``, private in every timm
# version; the public ``save_for_hf`` needs huggingface_hub and writes weights too).
# timm >= 1.0.31 writes the recorded constructor arguments and the model's current
#   ``num_classes``/``in_chans``/``global_pool`` as ``model_args``, so that
#   ``create_model("local-dir:...")`` and icrewrite's ``load`` rebuild the same architecture.
# timm 1.0.9 - 1.0.30 writes ``model_args`` only when the caller passes them: they are made here
#   the same way, from what icrewrite recorded and what can be read off the model.
def _global_pool(model: nn.Module) -> str | None:
    """The pooling type, read from the module that pools (as timm 1.0.31 reads it)."""
    head = getattr(model, "head", None)
    for pool in (getattr(head, "global_pool", None), getattr(head, "pool_type", None),
                 getattr(model, "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _observed_model_args(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments that the built model shows: ``num_classes``, ``in_chans`` (from the
    ``pretrained_cfg["first_conv"]`` layer) and ``global_pool``."""
    args: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        args["num_classes"] = model.num_classes
    in_chans = getattr(model, "in_chans", None)
    if not isinstance(in_chans, int):
        first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
        try:
            in_chans = model.get_submodule(first_conv).in_channels if isinstance(first_conv, str) else None
        except AttributeError:
            in_chans = None
    if isinstance(in_chans, int):
        args["in_chans"] = in_chans
    pool = _global_pool(model)
    if pool is not None:
        args["global_pool"] = pool
    return args


def _without_drop_rates(args: Mapping[str, Any]) -> dict[str, Any]:
    """Training-only arguments are not part of the architecture (timm 1.0.31 leaves them out too)."""
    return {k: v for k, v in args.items()
            if k not in ("drop_rate", "drop_path_rate", "drop_block_rate") and not k.endswith("_drop_rate")}


def save_config_for_hf(model: nn.Module, config_path: str | os.PathLike,
                       model_args: Mapping[str, Any] | None = None) -> None:
    """Write timm's ``config.json`` for ``model`` to ``config_path``. Its ``model_args`` are the
    recorded constructor arguments (:func:`model_args_recorded`), then what the model shows
    (``num_classes``, ``in_chans``, ``global_pool``), then ``model_args``, on every timm."""
    if TIMM_RECORDS_MODEL_ARGS:
        _timm_save_config_for_hf(model, Path(config_path), model_args=dict(model_args or {}))
        return
    args = _without_drop_rates(getattr(model, "_model_args", None) or {})
    args.update(_observed_model_args(model))
    args.update(model_args or {})
    _timm_save_config_for_hf(model, Path(config_path), model_args=args)


# =====================================================================================
# torch
# =====================================================================================

# --- is torch.export tracing: is_exporting ---------------------------------------------------
# ``torch.compiler.is_exporting()`` returns the flag ``torch.compiler._is_exporting_flag``, which
# ``torch.export`` (strict and non-strict, and the ONNX exporter built on it) sets while it traces.
# - torch 2.14 and later: Dynamo reads that flag when it traces the call, so the call is right.
# - torch 2.8 - 2.13 (seen on 2.8 and 2.11): Dynamo replaces every traced call of
#   ``torch.compiler.is_exporting()`` by the constant ``True``, so it claims to export under
#   ``torch.compile`` too. (``is_exporting() and not is_dynamo_compiling()`` would fix
#   ``torch.compile`` but claim not to export under strict ``torch.export``, which is Dynamo too.)
# The flag itself, read as a guarded global by Dynamo, is right on every version that has it,
# so it is read wherever it exists, and the public call is the fallback for a torch without it.
def is_exporting() -> bool:
    """True under ``torch.export`` (strict or not, and the exporters built on it), False under
    ``torch.compile`` and in eager mode, on every supported torch."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


# --- the torch.export-based ONNX exporter: onnx_export_without_draft ---------------------------
# ``torch.onnx.export(..., dynamo=True)`` tries its capture strategies in turn (the tuple
# ``torch.onnx._internal.exporter._capture_strategies.CAPTURE_STRATEGIES``): ``torch.export``
# non-strict, then strict, then, where present, draft export.
# - torch 2.14: draft export is in the tuple only when ``TORCH_ONNX_ENABLE_DRAFT_EXPORT`` is set.
# - torch 2.8: it is always there. Draft export records a data-dependent branch as the example
#   took it, so a model that ``torch.export`` refuses still "exports", and icrewrite reported the
#   dynamo exporter where 2.14 reports its refusal and takes the TorchScript fallback.
# Within :func:`onnx_export_without_draft` the tuple holds no draft strategy (the tuple is read
# when the exporter runs; where the module or the class is missing nothing changes), so every
# torch exports as 2.14 does by default.
def _draft_export_strategy(strategies: Any) -> type | None:
    return getattr(strategies, "TorchExportDraftExportStrategy", None)


@contextlib.contextmanager
def onnx_export_without_draft() -> Iterator[None]:
    """Within the block, ``torch.onnx.export(..., dynamo=True)`` captures the model with
    ``torch.export`` only, never with draft export (not thread-safe: it swaps a module global)."""
    try:
        from torch.onnx._internal.exporter import _capture_strategies as strategies
    except ImportError:  # a torch without this exporter layout: nothing to change
        yield
        return
    draft = _draft_export_strategy(strategies)
    tried = getattr(strategies, "CAPTURE_STRATEGIES", None)
    if draft is None or not isinstance(tried, tuple) or draft not in tried:
        yield
        return
    strategies.CAPTURE_STRATEGIES = tuple(s for s in tried if s is not draft)
    try:
        yield
    finally:
        strategies.CAPTURE_STRATEGIES = tried


@contextlib.contextmanager
def forked_rng(device: torch.device | str = "cpu", seed: int | None = None) -> Iterator[None]:
    """The default generators of the CPU and of ``device`` as they were once the block ends, seeded
    with ``seed`` inside it when given: random numbers drawn for a check or a measurement are no
    user's. torch 2.11 refuses ``fork_rng(device_type=None)``, which 2.14 reads as the current
    accelerator, so the device type is always named."""
    device = torch.device(device)
    accelerators = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerators, device_type=device.type):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()].manual_seed(seed)
        yield
