"""Fine-tune a model (IC or not) on one device or many, resumable after a crash.

``finetune(model, train_loader, val_loader, out_dir, epochs=..., lr=...)`` trains
``model`` in place with timm's optimisers and schedules and writes to ``out_dir``:

- ``last.pt``: the full training state (model, optimiser, schedule, EMA, epoch and
  step, every rank's RNG states and running epoch totals), written atomically every
  ``checkpoint_interval`` steps and at the end of each epoch. ``resume=True`` continues
  from it exactly: the same seed gives the same final parameters as a run that was
  never interrupted, and a run killed with SIGKILL loses at most one interval.
- ``best.safetensors`` / ``last.safetensors``: the model at its best validation
  accuracy and at the end of the last epoch, in icrewrite's checkpoint format.
- ``metrics.jsonl`` (one record per epoch) and ``metrics.png`` (loss and accuracy).

``time_steps(models, train_loader, ...)`` times the same training step for several models
interleaved, round by round on the same batches (what ``compare`` reports as step time).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains with
DistributedDataParallel (NCCL on GPU, Gloo on CPU); each rank reads its own shard,
and only rank 0 logs and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
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
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (ModelEmaV3, dispatch_clip_grad, distribute_bn, is_distributed_env, random_seed,
                        world_info_from_env)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import check_saveable
from ..checkpoint import save as save_model
from ..errors import LossNotFinite, TrainingError, require
from ..files import atomic_path
from .data import resumable_loader
from ..plot import plot_history

__all__ = ["FinetuneConfig", "FinetuneResult", "TrainingError", "LossNotFinite", "finetune", "is_primary", "joined_world", "time_steps"]

STATE_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
STATE_FORMAT = "icrewrite-train-state/1"
# Options that may change between a run and its resumption without changing its result.
RESUMABLE_CHANGES = frozenset({"resume", "progress", "checkpoint_interval", "device", "compile"})


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (each is also a keyword argument of it).

    ``opt``/``sched`` are any names timm's ``create_optimizer_v2``/``create_scheduler_v2``
    accept (``sched="none"`` keeps the learning rate constant); the schedule advances
    every step. ``amp`` (bf16 autocast) and ``channels_last`` default to on for CUDA.
    ``checkpoint_interval`` is in optimiser steps (0: only at the end of each epoch).
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
    ema: bool = False
    ema_decay: float = 0.998
    device: str | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    checkpoint_interval: int = 100
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.checkpoint_interval < 0:
            raise TrainingError(f"need epochs >= 1, lr > 0 and checkpoint_interval >= 0; got epochs={self.epochs}, "
                                f"lr={self.lr}, checkpoint_interval={self.checkpoint_interval}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainingError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


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
    """``[loss sum, correct predictions, samples]`` of one batch, in float64 on the batch's device."""
    correct = (logits.argmax(dim=1) == targets).sum()
    return torch.stack([loss_sum.double(), correct.double(), loss_sum.new_tensor(len(targets), dtype=torch.float64)])


class _Run:
    """One training run: the objects it trains and the position it has reached."""

    def __init__(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, out_dir: Path,
                 config: FinetuneConfig, world: World, device: torch.device) -> None:
        self.config, self.world, self.device, self.out_dir = config, world, device, out_dir
        self.amp = device.type == "cuda" if config.amp is None else config.amp
        channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if config.sync_bn and world.distributed:
            if device.type != "cuda":
                raise TrainingError("sync_bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
            model = convert_sync_batchnorm(model)
        self.model = model.to(device, memory_format=self.memory_format)
        self.train_loader = resumable_loader(train_loader, shuffle=True, seed=config.seed, rank=world.rank,
                                             world_size=world.size)
        self.val_loader = resumable_loader(val_loader, shuffle=False, seed=config.seed, rank=world.rank,
                                           world_size=world.size)
        if len(self.train_loader) == 0:
            raise TrainingError("the training data has fewer samples than one batch per rank")
        self.optimizer = create_optimizer_v2(self.model, opt=config.opt, lr=config.lr,
                                             weight_decay=config.weight_decay, momentum=config.momentum)
        self.scheduler = None if config.sched == "none" else create_scheduler_v2(
            self.optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=len(self.train_loader))[0]
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True) if config.ema else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.epoch = self.batch = self.step = 0  # epochs done, batches done in this epoch, optimiser steps
        self.totals = torch.zeros(3, dtype=torch.float64)  # this epoch, all ranks: loss sum, correct, samples
        self.epoch_time = 0.0
        self.history: list[dict[str, float]] = []
        self.best_acc, self.best_epoch = -1.0, 0
        self.train_model: nn.Module = self.model
        self.on_epoch: Callable[[dict[str, float]], None] = self.print_record

    def print_record(self, record: dict[str, float]) -> None:
        tqdm.write(format_record(record, self.config.epochs))

    # -- state ---------------------------------------------------------------------------

    def state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "progress": {"epoch": self.epoch, "batch": self.batch, "step": self.step, "totals": self.totals,
                         "epoch_time": self.epoch_time, "best_acc": self.best_acc, "best_epoch": self.best_epoch},
            "history": self.history,
            "rng": rng_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_compatible(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        progress = state["progress"]
        self.epoch, self.batch, self.step, self.totals = (progress["epoch"], progress["batch"], progress["step"],
                                                          progress["totals"])
        self.epoch_time, self.best_acc, self.best_epoch = (progress["epoch_time"], progress["best_acc"],
                                                           progress["best_epoch"])
        self.history = state["history"]
        _set_rng_state(state["rng"][self.world.rank])

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{self.out_dir / STATE_FILE} is not an icrewrite training state")
        if len(state["rng"]) != self.world.size:
            raise TrainingError(f"the run was saved by {len(state['rng'])} processes; resume it with as many "
                                f"(this is {self.world.size})")
        saved, now = state["config"], dataclasses.asdict(self.config)
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise TrainingError(f"cannot resume with different options ({diffs}); use the original ones or a new --out")

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

    def save_model(self, name: str) -> None:
        save_model(self.model, self.out_dir / name, force=True)

    # -- training ------------------------------------------------------------------------

    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in loader:
            yield (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   targets.to(self.device, non_blocking=True))

    def endless_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches epoch after epoch, in the order of epochs 0, 1, ..."""
        for epoch in itertools.count():
            self.train_loader.sampler.set_epoch(epoch)
            yield from self._batches(self.train_loader)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimiser step; returns the loss averaged over ranks. A non-finite loss stops
        the run before the step is applied, so ``last.pt`` stays the last good state."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.train_model(images)
        loss = self.criterion(logits.float(), targets)
        batch_totals = self._global_sum(_batch_totals(loss.detach() * len(targets), logits, targets))
        mean_loss = (batch_totals[0] / batch_totals[2]).item()
        if not math.isfinite(mean_loss):
            raise LossNotFinite(
                f"loss became {mean_loss} at epoch {self.epoch + 1}, step {self.step + 1} (lr "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); stopped, {self.out_dir / STATE_FILE} holds the last "
                "good state; try a lower lr or clip_grad")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            dispatch_clip_grad(self.model.parameters(), self.config.clip_grad)
        self.optimizer.step()
        self.step += 1
        if self.scheduler:
            self.scheduler.step_update(self.step)
        if self.ema:
            self.ema.update(self.model, step=self.step)
        self.totals += batch_totals
        return mean_loss

    def train_epoch(self) -> None:
        """Train the rest of the current epoch, checkpointing every ``checkpoint_interval`` steps."""
        loader, interval = self.train_loader, self.config.checkpoint_interval
        loader.sampler.set_epoch(self.epoch, skip=self.batch * loader.batch_size)
        self.train_model.train()
        bar = tqdm(self._batches(loader), total=self.batch + len(loader), initial=self.batch, unit="batch",
                   desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False,
                   disable=not (self.config.progress and self.world.primary))
        started = time.perf_counter()
        for images, targets in bar:
            loss = self.train_step(images, targets)
            self.batch += 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if interval and self.step % interval == 0:
                self.epoch_time += time.perf_counter() - started
                started = time.perf_counter()
                self.save_state()
        self.epoch_time += time.perf_counter() - started

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """``(loss, accuracy %)`` of ``model`` on the validation data, over all ranks."""
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        self.val_loader.sampler.set_epoch(0)
        for images, targets in self._batches(self.val_loader):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(images)
            sums += _batch_totals(F.cross_entropy(logits.float(), targets, reduction="sum"), logits, targets).cpu()
        loss_sum, correct, count = self._global_sum(sums).tolist()
        return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)

    def end_epoch(self) -> dict[str, float]:
        """Evaluate, log, plot and checkpoint the epoch just trained."""
        loss_sum, correct, count = self.totals.tolist()
        if self.world.distributed:  # ranks' BatchNorm statistics drift apart by one local update per step
            distribute_bn(self.model, self.world.size, reduce=True)
        val_loss, val_acc = self.evaluate(self.model)
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                  "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
                  "val_loss": val_loss, "val_acc": val_acc,
                  "epoch_time_s": self.epoch_time}
        if self.ema:
            record["ema_val_loss"], record["ema_val_acc"] = self.evaluate(self.ema.module)
        self.history.append(record)
        improved = val_acc > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = val_acc, self.epoch + 1
        if self.world.primary:
            _append_jsonl(self.out_dir / METRICS_FILE, record)
            plot_history({"model": self.history}, self.out_dir / PLOT_FILE)
            if improved:
                self.save_model("best.safetensors")
            self.save_model("last.safetensors")
        self.epoch, self.batch, self.epoch_time = self.epoch + 1, 0, 0.0
        self.totals = torch.zeros(3, dtype=torch.float64)
        self.save_state()
        return record

    def run(self) -> FinetuneResult:
        self.train_model = self.model
        if self.world.distributed:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.compile:
            self.train_model = torch.compile(self.train_model)
        while self.epoch < self.config.epochs:
            self.train_epoch()
            record = self.end_epoch()
            if self.world.primary:
                self.on_epoch(record)
        return FinetuneResult(self.out_dir, self.history, self.best_acc, self.best_epoch)


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
    check_saveable(model)  # likewise for the checkpoints
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not config.resume:
        raise TrainingError(f"{out_dir} already holds a run ({STATE_FILE}); resume it or choose another output folder")
    with joined_world(config.device) as world:
        run = None
        try:
            device = _device(config.device, world)
            random_seed(config.seed, world.rank)
            run = _Run(model, train_loader, val_loader, out_dir, config, world, device)
            if on_epoch is not None:
                run.on_epoch = on_epoch
            if config.resume and state_path.exists():
                run.load_state_dict(_load_state(state_path))
                if world.primary:
                    _rewrite_jsonl(out_dir / METRICS_FILE, run.history)
                    tqdm.write(f"resuming {out_dir}: {run.epoch} epoch(s) and {run.batch} batch(es) done, "
                               f"step {run.step}")
            elif world.primary:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / METRICS_FILE).unlink(missing_ok=True)
            return run.run()
        finally:
            # The DistributedDataParallel wrapper goes before the process group: its Reducer holds the
            # group, and the group's destructor joins Gloo's worker threads. Run from the Reducer's
            # destructor it holds the GIL, which a worker still releasing the tensors of the last
            # collective waits for: a deadlock (seen on torch 2.11, in about 1 of 10 two-rank runs).
            # Dropped here, the last reference is released without the GIL.
            if run is not None:
                run.train_model = run.model
            run = None


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
                runs[name].train_step(images, targets)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_:
                    seconds[name].append(time.perf_counter() - started)
        return seconds
