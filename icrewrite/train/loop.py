"""Fine-tune a model (IC or not) on one device or many, resumable after a crash.

``finetune(model, train_loader, val_loader, out_dir, epochs=..., lr=...)`` trains
``model`` in place with timm's optimisers and schedules and writes to ``out_dir``:

- ``last.pt``: the full training state (model, optimiser, schedule, EMA, epoch and
  step, every rank's RNG states and running epoch totals), written atomically every
  ``checkpoint_interval`` steps and at the end of each epoch. ``resume=True`` continues
  from it exactly: the same seed gives the same final parameters as a run that was
  never interrupted, and a run killed with SIGKILL loses at most one interval.
- ``best.safetensors`` / ``last.safetensors``: the model at its best validation
  accuracy and at the end of the last epoch, in icrewrite's checkpoint format, and the
  best ``checkpoint_hist`` epochs as ``checkpoint-EPOCH.safetensors`` (timm's
  ``CheckpointSaver``); ``ema.safetensors``: the EMA weights, with ``ema=True``. Every
  model file carries the training data's class names (``pretrained_cfg["label_names"]``).
- ``metrics.jsonl`` (one record per epoch), ``summary.csv`` (timm's ``update_summary``
  columns), ``metrics.png`` (loss and accuracy) and, with ``log_tensorboard``, a
  TensorBoard log in ``tensorboard/``.

The training recipe is timm's, built from its components: ``timm.data.Mixup`` with
``SoftTargetCrossEntropy`` (``mixup``, ``cutmix``), ``create_optimizer_v2(layer_decay=...)``,
gradient accumulation (``grad_accum_steps``), autocast in bf16 or fp16 with a gradient
scaler (``amp``), ``ModelEmaV3``. Everything that shapes a run (the model's identity and
weights, the data, image size, batch size and every option) is recorded in ``last.pt``;
``resume=True`` with any of them changed is refused, except the options in
:data:`RESUMABLE_CHANGES` and a larger ``epochs`` (see :meth:`_Run.check_resumable`).

``time_steps(models, train_loader, ...)`` times the same training step for several models
interleaved, round by round on the same batches (what ``compare`` reports as step time).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with
DistributedDataParallel (NCCL on GPU, Gloo on CPU); each rank reads its own shard,
and only rank 0 logs and writes files.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (CheckpointSaver, ModelEmaV3, dispatch_clip_grad, distribute_bn, is_distributed_env,
                        random_seed, update_summary, world_info_from_env)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import model_info
from ..checkpoint import check_saveable
from ..checkpoint import save as save_model
from ..errors import DataError, LossNotFinite, TrainingError, require
from ..files import atomic_path
from ..plot import plot_history
from ..rewrite import options_of
from .data import class_names, resumable_loader, set_model_class_names

__all__ = ["FinetuneConfig", "FinetuneResult", "TrainingError", "LossNotFinite", "finetune", "is_primary", "joined_world",
           "record_class_names", "time_steps"]

STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
PLOT_FILE = "metrics.png"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
EMA_FILE = "ema.safetensors"
TENSORBOARD_DIR = "tensorboard"
STATE_FORMAT = "icrewrite-train-state/2"
# Options that may change between a run and its resumption without changing its result (what is
# logged or how often last.pt is written). ``epochs`` may grow: see _Run.check_resumable.
RESUMABLE_CHANGES = frozenset({"resume", "progress", "checkpoint_interval", "log_tensorboard"})
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
MIXUP_MODES = ("batch", "pair", "elem")


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (each is also a keyword argument of it), named as timm's train.py names them.

    ``opt``/``sched`` are any names timm's ``create_optimizer_v2``/``create_scheduler_v2``
    accept (``sched="none"`` keeps the learning rate constant); the schedule advances
    every optimiser step. ``amp``: ``"bf16"``, ``"fp16"`` (with a gradient scaler) or
    ``"none"``; by default bf16 on CUDA and none elsewhere. ``channels_last`` defaults to
    on for CUDA. ``mixup``/``cutmix`` are the Beta-distribution alphas of ``timm.data.Mixup``
    (0: off), applied with probability ``mixup_prob`` and switched with ``mixup_switch_prob``.
    ``grad_accum_steps`` batches make one optimiser step. ``layer_decay`` scales each layer
    group's learning rate (timm's ``create_optimizer_v2``). ``checkpoint_hist`` best epochs
    are kept as model files. ``checkpoint_interval`` is in optimiser steps (0: only at the
    end of each epoch).
    """

    epochs: int = 10
    lr: float = 1e-3
    opt: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    grad_accum_steps: int = 1
    layer_decay: float | None = None
    ema: bool = False
    ema_decay: float = 0.998
    device: str | None = None
    amp: str | None = None
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    checkpoint_interval: int = 100
    checkpoint_hist: int = 1
    log_tensorboard: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # amp=True/False as before named choices existed
            self.amp = "bf16" if self.amp else "none"
        problems = [f"{name} {rule}, got {getattr(self, name)!r}" for name, rule, ok in self._rules() if not ok]
        if problems:
            raise TrainingError("bad training option(s): " + "; ".join(problems))

    def _rules(self) -> list[tuple[str, str, bool]]:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        return [
            ("epochs", "must be an integer >= 1", integer(self.epochs) and self.epochs >= 1),
            ("lr", "must be a finite number > 0", number(self.lr) and self.lr > 0),
            ("weight_decay", "must be a finite number >= 0", number(self.weight_decay) and self.weight_decay >= 0),
            ("momentum", "must be a finite number in [0, 1)", number(self.momentum) and 0 <= self.momentum < 1),
            ("warmup_epochs", "must be an integer >= 0", integer(self.warmup_epochs) and self.warmup_epochs >= 0),
            ("min_lr", "must be a finite number >= 0", number(self.min_lr) and self.min_lr >= 0),
            ("label_smoothing", "must be in [0, 1)", number(self.label_smoothing) and 0 <= self.label_smoothing < 1),
            ("clip_grad", "must be a finite number > 0 or None",
             self.clip_grad is None or (number(self.clip_grad) and self.clip_grad > 0)),
            ("mixup", "must be a finite number >= 0", number(self.mixup) and self.mixup >= 0),
            ("cutmix", "must be a finite number >= 0", number(self.cutmix) and self.cutmix >= 0),
            ("mixup_prob", "must be in [0, 1]", number(self.mixup_prob) and 0 <= self.mixup_prob <= 1),
            ("mixup_switch_prob", "must be in [0, 1]",
             number(self.mixup_switch_prob) and 0 <= self.mixup_switch_prob <= 1),
            ("mixup_mode", f"must be one of {', '.join(MIXUP_MODES)}", self.mixup_mode in MIXUP_MODES),
            ("grad_accum_steps", "must be an integer >= 1",
             integer(self.grad_accum_steps) and self.grad_accum_steps >= 1),
            ("layer_decay", "must be a finite number > 0 or None",
             self.layer_decay is None or (number(self.layer_decay) and self.layer_decay > 0)),
            ("ema_decay", "must be in (0, 1)", number(self.ema_decay) and 0 < self.ema_decay < 1),
            ("amp", f"must be one of {', '.join(AMP_DTYPES)} or None", self.amp is None or self.amp in AMP_DTYPES),
            ("seed", "must be an integer >= 0", integer(self.seed) and self.seed >= 0),
            ("checkpoint_interval", "must be an integer >= 0",
             integer(self.checkpoint_interval) and self.checkpoint_interval >= 0),
            ("checkpoint_hist", "must be an integer >= 1", integer(self.checkpoint_hist) and self.checkpoint_hist >= 1),
        ]

    @property
    def mixes(self) -> bool:
        """True when batches are mixed (mixup or cutmix on)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class FinetuneResult:
    """What a finished run reports; ``history`` holds the per-epoch records of ``metrics.jsonl``."""

    out_dir: Path
    history: list[dict[str, float]]
    best_acc: float
    best_epoch: int

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def is_primary() -> bool:
    """True in the process that logs and writes files: the only one, or rank 0 under torchrun."""
    return not is_distributed_env() or world_info_from_env()[1] == 0


@contextlib.contextmanager
def joined_world(requested_device: str | None) -> Iterator[World]:
    """Join the process group ``torchrun`` describes, if any, for the block; leave it after
    if the block created it. Work that trains several times in one process (``compare``)
    holds it around all of them: a group destroyed and created again does not rendezvous
    through the same store."""
    if not is_distributed_env():
        yield World()
        return
    local_rank, rank, size = world_info_from_env()
    created = not dist.is_initialized()
    if created:
        device_type = torch.device(requested_device or ("cuda" if torch.cuda.is_available() else "cpu")).type
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        yield World(rank, local_rank, size)
    finally:
        if created:
            dist.destroy_process_group()


def _device(requested: str | None, world: World) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def _rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_totals(loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[loss sum, top-1 correct, top-5 correct, samples]`` of one batch, in float64 on the batch's device
    (top-5 is top-k with k the number of classes when there are fewer than 5)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return torch.stack([loss_sum.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                        loss_sum.new_tensor(len(targets), dtype=torch.float64)])


def _fingerprint(items: Iterator[tuple[str, Any]]) -> str:
    """A SHA-256 (16 hex digits) of named tensors and values: equal exactly when they are."""
    digest = hashlib.sha256()
    for name, value in items:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def _model_identity(model: nn.Module) -> dict[str, Any]:
    """What the run starts from: the architecture, how it was converted, and its weights."""
    options = options_of(model)
    return {"model": model_info.architecture(model),
            "conversion": json.loads(json.dumps(options)) if options is not None else "not converted",
            "model_weights": _fingerprint(iter(model.state_dict().items()))}


def _describe_change(key: str, old: Any, new: Any) -> str:
    """``key old -> new`` for a message: only the differing entries of two mappings, and long values elided."""
    if isinstance(old, dict) and isinstance(new, dict):
        return f"{key} " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new})
                                     if old.get(k) != new.get(k))
    if isinstance(old, dict) or isinstance(new, dict):
        old, new = ("converted" if isinstance(v, dict) else v for v in (old, new))
        return f"{key} {old} -> {new}"
    if len(repr(old)) + len(repr(new)) > 160 or key == "model_weights":
        return f"{key} differs"
    return f"{key} {old!r} -> {new!r}"


def _data_identity(loader: DataLoader, split: str) -> dict[str, Any]:
    """What a split is: its size, batch size, transform, and its first sample as drawn by the run
    (``loader`` is a :func:`resumable_loader`, so the draw is seeded and leaves every RNG as it was)."""
    dataset = loader.dataset.dataset
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    image, label = loader.dataset[(0, 0)][:2] if len(dataset) else (torch.empty(0), -1)
    return {f"{split}_samples": len(dataset), f"{split}_batch_size": loader.batch_size,
            f"{split}_transform": repr(getattr(base, "transform", None)),
            f"{split}_input_shape": list(image.shape) if isinstance(image, torch.Tensor) else None,
            f"{split}_content": _fingerprint(iter([("image", image), ("label", label)]))}


class _ModelSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` writing icrewrite model files: ``last.safetensors`` every epoch,
    ``best.safetensors`` at the best validation accuracy and the best ``max_history`` epochs as
    ``checkpoint-EPOCH.safetensors`` (hard links where the file system has them)."""

    def __init__(self, model: nn.Module, out_dir: Path, max_history: int) -> None:
        super().__init__(model, None, checkpoint_dir=str(out_dir), max_history=max_history)
        self.extension = ".safetensors"

    def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
        save_model(self.model, save_path, force=True)

    def save_checkpoint(self, epoch: int, metric: float | None = None) -> tuple[float | None, int | None]:
        """timm's ``save_checkpoint``, with its ``model_best`` file renamed to ``best.safetensors`` (our
        name predates the saver). A leftover ``checkpoint-EPOCH`` of a run killed after writing it is
        replaced: timm 1.0.9 - 1.0.12 link without removing one first."""
        folder = Path(self.checkpoint_dir)
        (folder / f"{self.save_prefix}-{epoch}{self.extension}").unlink(missing_ok=True)
        result = super().save_checkpoint(epoch, metric)
        timm_best = folder / f"model_best{self.extension}"
        if timm_best.exists():
            os.replace(timm_best, folder / BEST_FILE)
        return result

    def bookkeeping(self) -> dict[str, Any]:
        return {"files": [(Path(f).name, m) for f, m in self.checkpoint_files], "best_epoch": self.best_epoch,
                "best_metric": self.best_metric}

    def restore(self, state: dict[str, Any]) -> None:
        self.checkpoint_files = [(str(Path(self.checkpoint_dir) / f), m) for f, m in state["files"]]
        self.best_epoch, self.best_metric = state["best_epoch"], state["best_metric"]


class _Run:
    """One training run: the objects it trains and the position it has reached."""

    def __init__(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, out_dir: Path,
                 config: FinetuneConfig, world: World, device: torch.device) -> None:
        self.config, self.world, self.device, self.out_dir = config, world, device, out_dir
        self.amp = AMP_DTYPES[config.amp or ("bf16" if device.type == "cuda" else "none")]
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.identity = _model_identity(model)
        if config.sync_bn and world.distributed:
            if device.type != "cuda":
                raise TrainingError("sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
            model = convert_sync_batchnorm(model)
        self.model = model.to(device, memory_format=self.memory_format)
        self.train_loader = resumable_loader(train_loader, shuffle=True, seed=config.seed, rank=world.rank,
                                             world_size=world.size)
        self.val_loader = resumable_loader(val_loader, shuffle=False, seed=config.seed, rank=world.rank,
                                           world_size=world.size)
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise TrainingError("the training data has fewer samples than one batch per rank")
        if config.mixes and train_loader.batch_size % 2:
            raise TrainingError(f"mixup and cutmix need an even batch size, got {train_loader.batch_size}")
        self.identity.update({**_data_identity(self.train_loader, "train"), **_data_identity(self.val_loader, "val"),
                              "class_names": class_names(train_loader.dataset), "world_size": world.size})
        self.optimizer = create_optimizer_v2(self.model, opt=config.opt, lr=config.lr,
                                             weight_decay=config.weight_decay, momentum=config.momentum,
                                             layer_decay=config.layer_decay)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum_steps)
        self.scheduler = self._scheduler()
        if self.scheduler is None:  # no schedule applies the layer-decay scales; do it once
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * group.get("lr_scale", 1.0)
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True) if config.ema else None
        self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                           switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                           label_smoothing=config.label_smoothing,
                           num_classes=self._num_classes()) if config.mixes else None
        self.criterion = (SoftTargetCrossEntropy() if self.mixup
                          else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing))
        self.saver = _ModelSaver(self.model, out_dir, config.checkpoint_hist)
        self.epoch = self.batch = self.step = 0  # epochs done, batches done in this epoch, optimiser steps
        self.totals = torch.zeros(4, dtype=torch.float64)  # this epoch, all ranks: see _batch_totals
        self.epoch_time = 0.0
        self.history: list[dict[str, float]] = []
        self.best_acc, self.best_epoch = -1.0, 0
        self.train_model: nn.Module = self.model
        self.tensorboard = None
        self.on_epoch: Callable[[dict[str, float]], None] = self.print_record

    def print_record(self, record: dict[str, float]) -> None:
        tqdm.write(format_record(record, self.config.epochs))

    @property
    def lr(self) -> float:
        """The schedule's current rate: the largest of the parameter groups' (layer decay scales the others)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _num_classes(self) -> int:
        classes = getattr(self.model, "num_classes", None)
        if not isinstance(classes, int) or classes < 1:
            raise TrainingError("mixup and cutmix need a model with a num_classes attribute (a timm model)")
        return classes

    def _scheduler(self) -> Any:
        if self.config.sched == "none":
            return None
        return create_scheduler_v2(
            self.optimizer, sched=self.config.sched, num_epochs=self.config.epochs,
            warmup_epochs=self.config.warmup_epochs, min_lr=self.config.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)[0]

    # -- state ---------------------------------------------------------------------------

    def state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": dataclasses.asdict(self.config),
            "identity": self.identity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "saver": self.saver.bookkeeping(),
            "progress": {"epoch": self.epoch, "batch": self.batch, "step": self.step, "totals": self.totals,
                         "epoch_time": self.epoch_time, "best_acc": self.best_acc, "best_epoch": self.best_epoch},
            "history": self.history,
            "rng": rng_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extended = self.check_resumable(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and not extended:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.saver.restore(state["saver"])
        progress = state["progress"]
        self.epoch, self.batch, self.step, self.totals = (progress["epoch"], progress["batch"], progress["step"],
                                                          progress["totals"])
        self.epoch_time, self.best_acc, self.best_epoch = (progress["epoch_time"], progress["best_acc"],
                                                           progress["best_epoch"])
        self.history = state["history"]
        if self.scheduler and extended:  # the longer schedule, from the step reached
            self.scheduler.step_update(self.step)
        _set_rng_state(state["rng"][self.world.rank])

    def check_resumable(self, state: dict[str, Any]) -> bool:
        """Refuse, in one line naming them, every difference between the saved run and this one
        but the options in ``RESUMABLE_CHANGES`` and a larger ``epochs``. Returns True when
        ``epochs`` grew: the schedule is then rebuilt for the new length and continues from
        the step reached (the steps taken keep the rates they had)."""
        path = self.out_dir / STATE_FILE
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{path} is not an icrewrite training state of this version ({STATE_FORMAT}); "
                                "start a new run in another folder")
        saved, now = state["config"], dataclasses.asdict(self.config)
        changed = [k for k in now if k not in RESUMABLE_CHANGES | {"epochs"} and saved.get(k) != now[k]]
        if now["epochs"] < saved.get("epochs", 0):
            changed.append("epochs")
        diffs = [_describe_change(k, saved.get(k), now[k]) for k in changed]
        saved_identity = state.get("identity", {})
        diffs += [_describe_change(key, saved_identity.get(key), value) for key, value in self.identity.items()
                  if saved_identity.get(key) != value]
        if diffs:
            raise TrainingError(f"cannot resume {self.out_dir} with another setup ({'; '.join(diffs)}); use the "
                                "original model, data and options (only --epochs may grow), or a new output folder")
        return now["epochs"] != saved["epochs"]

    def save_state(self) -> None:
        """Write ``last.pt``; all ranks take part, each contributing its RNG states."""
        rng_state = _rng_state()
        rng_states = [rng_state]
        if self.world.distributed:
            rng_states = [None] * self.world.size
            dist.all_gather_object(rng_states, rng_state)
        if self.world.primary:
            with atomic_path(self.out_dir / STATE_FILE) as tmp:
                torch.save(self.state_dict(rng_states), tmp)

    # -- training ------------------------------------------------------------------------

    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(loader)
        while True:
            try:
                images, targets = next(batches)
            except StopIteration:
                return
            except DataError as err:  # from a worker process, torch adds its traceback: keep the one line
                raise DataError(str(err).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}."
                                                                               f"{DataError.__name__}: ")) from err
            yield (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   targets.to(self.device, non_blocking=True))

    def endless_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches epoch after epoch, in the order of epochs 0, 1, ..."""
        for epoch in itertools.count():
            self.train_loader.sampler.set_epoch(epoch)
            yield from self._batches(self.train_loader)

    def _stopped(self, mean_loss: float) -> LossNotFinite:
        path = self.out_dir / STATE_FILE
        kept = (f"{path} holds the last good state" if path.exists()
                else "no training state was written yet")
        return LossNotFinite(
            f"loss became {mean_loss} at epoch {self.epoch + 1}, step {self.step + 1} (lr "
            f"{self.lr:.3g}); stopped, {kept}; try a lower lr or clip_grad")

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of one batch (mixed when mixup/cutmix are on), and the optimiser
        step after the last batch of each group of ``grad_accum_steps`` (a shorter group ends an
        epoch whose length it does not divide). Returns the batch's loss averaged over ranks. A
        non-finite loss stops the run before the step is applied, so ``last.pt`` stays the last
        good state."""
        accum = self.config.grad_accum_steps
        group_start = self.batch // accum * accum
        group = min(accum, self.batches_per_epoch - group_start)
        last = self.batch + 1 - group_start >= group
        if self.batch == group_start:
            self.optimizer.zero_grad(set_to_none=True)
        inputs, soft_targets = self.mixup(images, targets) if self.mixup else (images, targets)
        sync = contextlib.nullcontext() if last or not self.world.distributed else self.train_model.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = self.train_model(inputs)
            loss = self.criterion(logits.float(), soft_targets)
            batch_totals = self._global_sum(_batch_totals(loss.detach() * len(targets), logits, targets))
            mean_loss = (batch_totals[0] / batch_totals[3]).item()
            if not math.isfinite(mean_loss):
                raise self._stopped(mean_loss)
            scaled = loss / group
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        self.batch += 1
        self.totals += batch_totals
        if last:
            self._optimizer_step()
        return mean_loss

    def _optimizer_step(self) -> None:
        if self.scaler:
            if self.config.clip_grad:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), self.config.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.config.clip_grad:
                dispatch_clip_grad(self.model.parameters(), self.config.clip_grad)
            self.optimizer.step()
        self.step += 1
        if self.scheduler:
            self.scheduler.step_update(self.step)
        if self.ema:
            self.ema.update(self.model, step=self.step)

    def train_epoch(self) -> None:
        """Train the rest of the current epoch, checkpointing every ``checkpoint_interval`` steps."""
        loader, interval = self.train_loader, self.config.checkpoint_interval
        loader.sampler.set_epoch(self.epoch, skip=self.batch * loader.batch_size)
        self.train_model.train()
        bar = tqdm(self._batches(loader), total=self.batches_per_epoch, initial=self.batch, unit="batch",
                   desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
                   disable=not (self.config.progress and self.world.primary))
        started = time.perf_counter()
        for images, targets in bar:
            step = self.step
            loss = self.train_batch(images, targets)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}")
            if interval and self.step != step and self.step % interval == 0 and self.batch < self.batches_per_epoch:
                self.epoch_time += time.perf_counter() - started
                started = time.perf_counter()
                self.save_state()
        self.epoch_time += time.perf_counter() - started

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        """``(loss, top-1 %, top-5 %)`` of ``model`` on the validation data, over all ranks."""
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        self.val_loader.sampler.set_epoch(0)
        for images, targets in self._batches(self.val_loader):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = model(images)
            sums += _batch_totals(F.cross_entropy(logits.float(), targets, reduction="sum"), logits, targets).cpu()
        loss_sum, correct, correct5, count = self._global_sum(sums).tolist()
        count = max(count, 1)
        return loss_sum / count, 100.0 * correct / count, 100.0 * correct5 / count

    def end_epoch(self) -> dict[str, float]:
        """Evaluate, log, plot and checkpoint the epoch just trained."""
        loss_sum, correct, _, count = self.totals.tolist()
        if self.world.distributed:  # ranks' BatchNorm statistics drift apart by one local update per step
            distribute_bn(self.model, self.world.size, reduce=True)
        val_loss, val_acc, val_top5 = self.evaluate(self.model)
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr,
                  "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
                  "val_loss": val_loss, "val_acc": val_acc, "val_top5": val_top5,
                  "epoch_time_s": self.epoch_time}
        if self.ema:
            record["ema_val_loss"], record["ema_val_acc"], _ = self.evaluate(self.ema.module)
        self.history.append(record)
        if val_acc > self.best_acc:
            self.best_acc, self.best_epoch = val_acc, self.epoch + 1
        if self.world.primary:
            _append_jsonl(self.out_dir / METRICS_FILE, record)
            _write_summary(self.out_dir / SUMMARY_FILE, self.history)
            plot_history({"model": self.history}, self.out_dir / PLOT_FILE)
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step"):
                        self.tensorboard.add_scalar(key, value, record["epoch"])
                self.tensorboard.flush()
            self.saver.save_checkpoint(self.epoch + 1, metric=val_acc)
            if self.ema:
                save_model(self.ema.module, self.out_dir / EMA_FILE, force=True)
        self.epoch, self.batch, self.epoch_time = self.epoch + 1, 0, 0.0
        self.totals = torch.zeros(4, dtype=torch.float64)
        self.save_state()
        return record

    def run(self) -> FinetuneResult:
        self.train_model = self.model
        if self.world.distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)
        if self.config.log_tensorboard and self.world.primary:
            self.tensorboard = _tensorboard_writer(self.out_dir / TENSORBOARD_DIR)
        try:
            while self.epoch < self.config.epochs:
                self.train_epoch()
                record = self.end_epoch()
                if self.world.primary:
                    self.on_epoch(record)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        return FinetuneResult(self.out_dir, self.history, self.best_acc, self.best_epoch)


def _tensorboard_writer(folder: Path) -> Any:
    require("tensorboard", "tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def _write_summary(path: Path, history: list[dict[str, float]]) -> None:
    """``summary.csv`` as timm's train.py writes it (``update_summary``: epoch, train_loss, eval_loss,
    eval_top1, eval_top5, lr), rewritten whole from the history so that a resumed run matches."""
    with atomic_path(path) as tmp:
        for record in history:
            update_summary(record["epoch"], collections.OrderedDict(loss=record["train_loss"]),
                           collections.OrderedDict(loss=record["val_loss"], top1=record["val_acc"],
                                                   top5=record["val_top5"]),
                           str(tmp), lr=record["lr"], write_header=record is history[0])


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` by ``records``: a resumed run drops epochs logged after its checkpoint."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def format_record(record: dict[str, float], epochs: int) -> str:
    """An epoch's record as the one line ``finetune`` prints."""
    line = (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%  "
            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2f}%")
    if "ema_val_acc" in record:
        line += f"  ema acc {record['ema_val_acc']:.2f}%"
    return line + f"  ({record['epoch_time_s']:.1f} s)"


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt state is a user-facing condition, whatever torch raises
        raise TrainingError(f"cannot read training state {path}: {err}") from err


def finetune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Train ``model`` in place and write checkpoints, metrics and a plot to ``out_dir``.

    Options are the fields of :class:`FinetuneConfig`, given as ``config`` and/or as
    keywords (keywords win): ``finetune(model, train, val, "runs/a", epochs=5, lr=3e-4)``.
    The loaders' datasets, batch size (per process) and workers are used; their order is
    replaced by one fixed by ``seed`` and epoch, so that ``resume=True`` is exact.
    ``on_epoch`` receives each epoch's record on the primary process instead of its line being
    printed (``compare`` shows one progress bar for all its runs).
    Raises :class:`LossNotFinite` when the loss diverges, and before training the
    ``CheckpointError`` that saving the model would raise.
    """
    config = dataclasses.replace(config or FinetuneConfig(), **options)
    require("matplotlib", "train")  # for metrics.png: say so before training, not after the first epoch
    if config.log_tensorboard:
        require("tensorboard", "tensorboard")
    record_class_names(model, train_loader, val_loader)
    check_saveable(model)  # likewise for the checkpoints
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not config.resume:
        raise TrainingError(f"{out_dir} already holds a run ({STATE_FILE}); resume it or choose another output folder")
    created = not out_dir.exists()
    with joined_world(config.device) as world:
        run = None
        try:
            device = _device(config.device, world)
            random_seed(config.seed, world.rank)
            run = _Run(model, train_loader, val_loader, out_dir, config, world, device)
            if on_epoch is not None:
                run.on_epoch = on_epoch
            if config.resume and state_path.exists():
                try:
                    run.load_state_dict(_load_state(state_path))
                except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:  # a damaged or foreign file
                    raise TrainingError(f"cannot resume from {state_path}: it is damaged or not a training state "
                                        f"of this run ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                                        ) from err
                if world.primary:
                    _rewrite_jsonl(out_dir / METRICS_FILE, run.history)
                    tqdm.write(f"resuming {out_dir}: {run.epoch} epoch(s) and {run.batch} batch(es) done, "
                               f"step {run.step}")
            elif world.primary:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / METRICS_FILE).unlink(missing_ok=True)
            return run.run()
        except BaseException:
            if created and world.primary:  # a run that failed before writing anything leaves no empty folder
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
            raise
        finally:
            # The DistributedDataParallel wrapper goes before the process group: its Reducer holds the
            # group, and the group's destructor joins Gloo's worker threads. Run from the Reducer's
            # destructor it holds the GIL, which a worker still releasing the tensors of the last
            # collective waits for: a deadlock (seen on torch 2.11, in about 1 of 10 two-rank runs).
            # Dropped here, the last reference is released without the GIL.
            if run is not None:
                run.train_model = run.model
            run = None


def record_class_names(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader) -> list[str] | None:
    """Record the training data's class names on ``model`` (see ``data.set_model_class_names``), so
    that every model file of the run names its outputs. Refuses validation data indexed with
    other class names, and a model with fewer outputs than the data has classes."""
    names, val_names = class_names(train_loader.dataset), class_names(val_loader.dataset)
    if names and val_names and names != val_names:
        raise DataError(f"the validation data indexes its classes differently from the training data (training: "
                        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; validation: "
                        f"{', '.join(val_names[:5])}{' ...' if len(val_names) > 5 else ''}); read both with the "
                        "training split's class index (icrewrite.train.data.make_dataset does)")
    outputs = getattr(model, "num_classes", None)
    if names and isinstance(outputs, int) and outputs > 0:
        if outputs < len(names):
            raise TrainingError(f"the data has {len(names)} classes but the model has {outputs} outputs; build it "
                                f"with num_classes={len(names)} (or reset_classifier({len(names)}))")
        if outputs == len(names):
            set_model_class_names(model, names)
            return names
    return None


def time_steps(models: Mapping[str, nn.Module], train_loader: DataLoader, config: FinetuneConfig | None = None, *,
               rounds: int = 20, **options: Any) -> dict[str, list[float]]:
    """Seconds per training step of each model, measured interleaved: ``rounds`` rounds, each
    one step of every model on the same batch, the models' order rotating from round to round.

    Each model trains a copy with :func:`finetune`'s step (optimiser, schedule, autocast,
    memory format) on its own process; load changes on a shared machine then touch every
    model alike, which timing whole runs one after another cannot promise. One warm-up round
    is run first and not reported. Under torchrun every rank times its own steps without
    DistributedDataParallel (the gradient all-reduce costs every model alike). Returns
    ``{name: [seconds of round 1, ...]}``.
    """
    config = dataclasses.replace(config or FinetuneConfig(), **options)
    with joined_world(config.device) as world:
        device = _device(config.device, world)
        random_seed(config.seed, world.rank)
        runs = {name: _Run(copy.deepcopy(model), train_loader, train_loader, Path(), config, world, device)
                for name, model in models.items()}
        for run in runs.values():
            run.model.train()
        batches = next(iter(runs.values())).endless_batches()
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for round_ in range(rounds + 1):
            images, targets = next(batches)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                started = time.perf_counter()
                run = runs[name]
                run.batch %= run.batches_per_epoch  # timing goes on past the end of an epoch
                run.train_batch(images, targets)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_:
                    seconds[name].append(time.perf_counter() - started)
        return seconds
