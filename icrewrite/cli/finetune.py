"""``icrewrite finetune MODEL --data DATA -o OUT``: train a model (IC or not) and write checkpoints."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from timm.utils import ParseKwargs
from torch import nn
from torch.utils.data import DataLoader

from .. import convert
from ..errors import DataError, ICRewriteError, TrainingError, require
from ..rewrite import options_of
from ..train.data import DIGITS, num_classes
from ..train import FinetuneConfig, FinetuneResult, finetune
from ..train.loop import AMP_DTYPES, MIXUP_MODES, is_primary
from ._data import DIGITS_IMG_SIZES, loader_workers, model_img_size, model_loader
from . import add_command, add_conversion_arguments, add_model_arguments, conversion_options, model_from_args, progress

DIGITS_IMG_SIZE = DIGITS_IMG_SIZES["finetune"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "finetune",
        summary="fine-tune a model on an image dataset, resumably",
        description="Train MODEL (a timm name, or a checkpoint written by `icrewrite convert`) on DATA and write "
                    "to OUT: last.pt (the full training state, for --resume), best.safetensors and "
                    "last.safetensors (models, read by icrewrite.load and `icrewrite export`), metrics.jsonl and "
                    "metrics.png. Uses CUDA when present (bf16 autocast, channels_last). Under torchrun the same "
                    "command trains on every process with DistributedDataParallel (--batch-size is per process). "
                    "A killed run continues exactly with the same command plus --resume.",
        example="icrewrite finetune resnet18 --convert --data digits --epochs 5 -o runs/resnet18_ic\n"
                "  torchrun --nproc-per-node 4 -m icrewrite.cli finetune runs/model_ic --data /data/imagenette "
                "-o runs/ddp",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder of the run")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT (a fresh start if it has none)")
    parser.add_argument("--convert", action="store_true",
                        help="convert MODEL into an IC network first (with the conversion options below)")
    training = add_training_arguments(parser)
    training.add_argument("--seed", type=int, default=FinetuneConfig.seed, metavar="N",
                          help="seed of new weights, data order, augmentation and dropout (default 0)")
    add_conversion_arguments(parser)
    parser.set_defaults(func=run)


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data and training options of a ``finetune`` run (see ``loaders_from_args``, ``config_from_args``),
    named as timm's train.py names them, and ``-c FILE`` (a YAML file of them); returns the training
    group, for a command's own additions."""
    parser.add_argument("-c", "--config", metavar="FILE.yaml",
                        help="read options from a YAML file whose keys are the long option names (lr, batch-size "
                             "or batch_size, ...); options on the command line override it")
    _read_config_file_after_parsing(parser)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="more arguments for timm.create_model, e.g. drop_path_rate=0.1 (values as Python "
                             "literals)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=DIGITS, metavar="DATA",
                      help="'digits' (embedded, default), an ImageFolder directory (with train/ and val/ "
                           "sub-folders, or class folders split 80/20), or a timm dataset NAME:ROOT")
    data.add_argument("--img-size", type=int, metavar="PIXELS",
                      help=f"image size (default: {DIGITS_IMG_SIZE} for digits, else the model's input size)")
    data.add_argument("--batch-size", type=int, default=64, metavar="N", help="batch size per process (default 64)")
    data.add_argument("--workers", type=int, metavar="N",
                      help="data-loading worker processes (default: 0 for digits, which is in memory, else 4)")
    data.add_argument("--aa", metavar="POLICY",
                      help="timm auto-augmentation of training images: rand-m9-mstd0.5, augmix-m5-w3, "
                           "original, v0, ... (create_transform's auto_augment; folders and timm datasets)")
    data.add_argument("--reprob", type=float, default=0.0, metavar="P",
                      help="random-erasing probability of training images (create_transform's re_prob; default 0)")
    train = parser.add_argument_group("training")
    defaults = FinetuneConfig()
    train.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                       help=f"default {defaults.epochs}; may grow on --resume")
    train.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    train.add_argument("--opt", default=defaults.opt, help=f"any timm optimizer name (default {defaults.opt})")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="WD",
                       help=f"default {defaults.weight_decay}")
    train.add_argument("--momentum", type=float, default=defaults.momentum, metavar="M",
                       help=f"optimizer momentum (default {defaults.momentum})")
    train.add_argument("--sched", default=defaults.sched,
                       help=f"any timm scheduler name, or none (default {defaults.sched})")
    train.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs, metavar="N", help="default 0")
    train.add_argument("--min-lr", type=float, default=defaults.min_lr, metavar="LR",
                       help=f"lower bound of the schedule (default {defaults.min_lr:g})")
    train.add_argument("--layer-decay", type=float, metavar="F",
                       help="layer-wise learning-rate decay (timm's create_optimizer_v2 layer_decay)")
    train.add_argument("--label-smoothing", "--smoothing", type=float, default=defaults.label_smoothing,
                       metavar="EPS", help=f"default {defaults.label_smoothing}")
    train.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM")
    train.add_argument("--mixup", type=float, default=defaults.mixup, metavar="ALPHA",
                       help="mixup alpha (timm.data.Mixup; 0: off, default)")
    train.add_argument("--cutmix", type=float, default=defaults.cutmix, metavar="ALPHA",
                       help="cutmix alpha (0: off, default)")
    train.add_argument("--mixup-prob", type=float, default=defaults.mixup_prob, metavar="P",
                       help=f"probability of mixing a batch (default {defaults.mixup_prob:g})")
    train.add_argument("--mixup-switch-prob", type=float, default=defaults.mixup_switch_prob, metavar="P",
                       help=f"probability of cutmix instead of mixup when both are on "
                            f"(default {defaults.mixup_switch_prob:g})")
    train.add_argument("--mixup-mode", default=defaults.mixup_mode, choices=MIXUP_MODES,
                       help=f"mix per batch, pair or element (default {defaults.mixup_mode})")
    train.add_argument("--grad-accum-steps", type=int, default=defaults.grad_accum_steps, metavar="N",
                       help="batches per optimizer step (default 1)")
    train.add_argument("--amp", choices=tuple(AMP_DTYPES),
                       help="autocast dtype: bf16, fp16 (with a gradient scaler) or none (default: bf16 on CUDA, "
                            "none on CPU)")
    train.add_argument("--ema", action="store_true",
                       help="also keep an EMA of the weights: evaluated each epoch, written as ema.safetensors")
    train.add_argument("--ema-decay", type=float, default=defaults.ema_decay, metavar="DECAY",
                       help=f"default {defaults.ema_decay}")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    train.add_argument("--compile", action="store_true", help="train through torch.compile")
    train.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA, torchrun)")
    train.add_argument("--checkpoint-interval", type=int, default=defaults.checkpoint_interval, metavar="STEPS",
                       help=f"write last.pt every STEPS steps and after each epoch (default "
                            f"{defaults.checkpoint_interval}); a killed run loses at most that much")
    train.add_argument("--checkpoint-hist", type=int, default=defaults.checkpoint_hist, metavar="N",
                       help="keep the best N epochs as checkpoint-EPOCH.safetensors (default 1)")
    train.add_argument("--log-tensorboard", action="store_true",
                       help="also write a TensorBoard log to OUT/tensorboard (pip install 'icrewrite[tensorboard]')")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return train


class _Unset(list):
    """The value of an option not given on the command line, while a config file is applied (a list,
    so that append actions accept it)."""


def _read_config_file_after_parsing(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` apply ``-c FILE`` after parsing: each key (a long option name, with dashes or
    underscores) sets its option unless the command line gave that option. Which options were given
    is found by parsing again with every default replaced by a marker."""
    parse_known_args = parser.parse_known_args

    def parse_with_config(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = parse_known_args(args, namespace)
        if getattr(parsed, "config", None):
            marked = argparse.Namespace(**{a.dest: _Unset() for a in parser._actions if a.dest != argparse.SUPPRESS})
            given = parse_known_args(args, marked)[0]
            explicit = {dest for dest, value in vars(given).items() if not (type(value) is _Unset and not value)}
            try:
                apply_config_file(parser, parsed, parsed.config, explicit)
            except ICRewriteError as err:  # a bad file or a missing PyYAML: argparse's one error line
                parser.error(str(err))
        return parsed, rest

    parser.parse_known_args = parse_with_config  # type: ignore[method-assign]


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str,
                      explicit: set[str]) -> None:
    """Set the options that ``path`` (YAML, keys = long option names) names on ``args``, except
    those in ``explicit``; an unknown key or a value of the wrong kind is a one-line error."""
    yaml = require("yaml", "train")
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TrainingError(f"cannot read config file {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise TrainingError(f"config file {path} must be a mapping of option names to values")
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    for key, value in values.items():
        action = by_flag.get("--" + str(key).replace("_", "-"))
        if action is None or action.dest in ("config", "help"):
            raise TrainingError(f"config file {path}: unknown option {key!r} (keys are long option names)")
        if action.dest in explicit:
            continue
        setattr(args, action.dest, _config_value(action, key, value, path))


def _config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """``value`` from the config file as the command line would have set ``action``'s option."""
    def wrong(expected: str) -> TrainingError:
        return TrainingError(f"config file {path}: {key} must be {expected}, got {value!r}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return action.const if value else action.default
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return dict(value)
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [str(item) for item in items]
    if value is not None and action.type is not None:
        if isinstance(value, bool):
            raise wrong("a number")
        try:
            value = action.type(value)
        except (TypeError, ValueError) as err:
            raise wrong(f"of type {action.type.__name__}") from err
        except argparse.ArgumentTypeError as err:  # the option's own check (positive_int, at_least)
            raise TrainingError(f"config file {path}: {key}: {err}") from err
    elif value is not None:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def with_classes(model: nn.Module, classes: int) -> nn.Module:
    """``model`` with a ``classes``-way classifier (timm's ``reset_classifier`` when it differs)."""
    if getattr(model, "num_classes", classes) != classes:
        progress(f"new {classes}-class classifier (the model has {model.num_classes}; pass --num-classes to create "
                 "it with the right size)")
        model.reset_classifier(classes)
    return model


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The ``FinetuneConfig`` that ``add_training_arguments`` options (and ``--seed``, ``--resume``) describe;
    raises ``TrainingError`` naming every bad number (data options too), before anything is loaded."""
    problems = _data_problems(args)
    try:
        config = _config(args)
    except TrainingError as err:
        problems.insert(0, str(err))
    if problems:
        raise TrainingError("; ".join(problems))
    return config


def _config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        epochs=args.epochs, lr=args.lr, opt=args.opt, weight_decay=args.weight_decay, momentum=args.momentum,
        sched=args.sched, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad, mixup=args.mixup, cutmix=args.cutmix, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode, grad_accum_steps=args.grad_accum_steps,
        layer_decay=args.layer_decay, ema=args.ema, ema_decay=args.ema_decay, device=args.device, amp=args.amp,
        compile=args.compile, sync_bn=args.sync_bn, seed=getattr(args, "seed", FinetuneConfig.seed),
        checkpoint_interval=args.checkpoint_interval, checkpoint_hist=args.checkpoint_hist,
        log_tensorboard=args.log_tensorboard, resume=args.resume, progress=args.progress)


def _data_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and args.img_size < 1:
        problems.append(f"--img-size must be >= 1, got {args.img_size}")
    if args.workers is not None and args.workers < 0:
        problems.append(f"--workers must be >= 0, got {args.workers}")
    if not (math.isfinite(args.reprob) and 0 <= args.reprob <= 1):
        problems.append(f"--reprob must be in [0, 1], got {args.reprob}")
    return problems


def check_data_arguments(args: argparse.Namespace) -> None:
    """Refuse bad data numbers in one line, before anything is loaded or written."""
    if problems := _data_problems(args):
        raise DataError("; ".join(problems))


def loaders_from_args(args: argparse.Namespace, model: nn.Module) -> list[DataLoader]:
    """``[train, validation]`` loaders of ``--data`` at ``--img-size`` (default: what the model expects),
    training images augmented with ``--aa`` and ``--reprob``."""
    check_data_arguments(args)
    img_size = model_img_size(model, args.data, args.img_size, DIGITS_IMG_SIZE)
    progress(f"reading {args.data} at {img_size}x{img_size}")
    workers = loader_workers(args.data, args.workers)
    augment = {"auto_augment": args.aa, "re_prob": args.reprob}
    return [model_loader(model, args.data, split, args.batch_size, img_size=img_size, num_workers=workers,
                         **(augment if split == "train" else {}))
            for split in ("train", "validation")]


def _summary(result: FinetuneResult) -> str:
    final = result.final
    return "\n".join([
        f"final: val acc {final['val_acc']:.2f}%, val loss {final['val_loss']:.4f}, train loss "
        f"{final['train_loss']:.4f}",
        f"best:  val acc {result.best_acc:.2f}% at epoch {result.best_epoch}",
        f"wrote {result.out_dir}/best.safetensors, last.safetensors, last.pt, metrics.jsonl, summary.csv, metrics.png"
        + (", ema.safetensors" if "ema_val_acc" in final else ""),
    ])


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # bad numbers: one line before any work
    if config.log_tensorboard:
        require("tensorboard", "tensorboard")
    torch.manual_seed(args.seed)  # initial weights of anything new: a classifier, IC blocks
    model = model_from_args(args)
    loaders = loaders_from_args(args, model)
    model = with_classes(model, num_classes(loaders[0].dataset))
    if args.convert:
        if options_of(model) is None:
            progress("converting to an IC network")
            model = convert(model, inplace=True, **conversion_options(args))
        else:
            progress("the model is already an IC network; --convert changes nothing")
    result = finetune(model, *loaders, args.out, config)
    if is_primary():
        print(_summary(result))
    return 0
