"""``icrewrite finetune MODEL --data DATA -o OUT``: train a model (IC or not) and write checkpoints."""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import convert
from ..rewrite import options_of
from ..train.data import DIGITS, num_classes
from ..train import FinetuneConfig, FinetuneResult, finetune
from ..train.loop import is_primary
from ._data import DIGITS_IMG_SIZES, model_img_size, model_loader
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
    """The data and training options of a ``finetune`` run (see ``loaders_from_args``, ``config_from_args``);
    returns the training group, for a command's own additions."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=DIGITS, metavar="DATA",
                      help="'digits' (embedded, default), an ImageFolder directory (with train/ and val/ "
                           "sub-folders, or class folders split 80/20), or a timm dataset NAME:ROOT")
    data.add_argument("--img-size", type=int, metavar="PIXELS",
                      help=f"image size (default: {DIGITS_IMG_SIZE} for digits, else the model's input size)")
    data.add_argument("--batch-size", type=int, default=64, metavar="N", help="batch size per process (default 64)")
    data.add_argument("--workers", type=int, metavar="N",
                      help="data-loading worker processes (default: 0 for digits, which is in memory, else 4)")
    train = parser.add_argument_group("training")
    defaults = FinetuneConfig()
    train.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N", help=f"default {defaults.epochs}")
    train.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    train.add_argument("--opt", default=defaults.opt, help=f"any timm optimizer name (default {defaults.opt})")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="WD",
                       help=f"default {defaults.weight_decay}")
    train.add_argument("--sched", default=defaults.sched,
                       help=f"any timm scheduler name, or none (default {defaults.sched})")
    train.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs, metavar="N", help="default 0")
    train.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, metavar="EPS",
                       help=f"default {defaults.label_smoothing}")
    train.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM")
    train.add_argument("--ema", action="store_true", help="also keep and evaluate an EMA of the weights")
    train.add_argument("--ema-decay", type=float, default=defaults.ema_decay, metavar="DECAY",
                       help=f"default {defaults.ema_decay}")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    train.add_argument("--compile", action="store_true", help="train through torch.compile")
    train.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA, torchrun)")
    train.add_argument("--checkpoint-interval", type=int, default=defaults.checkpoint_interval, metavar="STEPS",
                       help=f"write last.pt every STEPS steps and after each epoch (default "
                            f"{defaults.checkpoint_interval}); a killed run loses at most that much")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return train


def with_classes(model: nn.Module, classes: int) -> nn.Module:
    """``model`` with a ``classes``-way classifier (timm's ``reset_classifier`` when it differs)."""
    if getattr(model, "num_classes", classes) != classes:
        progress(f"new {classes}-class classifier (the model has {model.num_classes}; pass --num-classes to create "
                 "it with the right size)")
        model.reset_classifier(classes)
    return model


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The ``FinetuneConfig`` that ``add_training_arguments`` options (and ``--seed``, ``--resume``) describe."""
    return FinetuneConfig(
        epochs=args.epochs, lr=args.lr, opt=args.opt, weight_decay=args.weight_decay, sched=args.sched,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, clip_grad=args.clip_grad,
        ema=args.ema, ema_decay=args.ema_decay, device=args.device, compile=args.compile, sync_bn=args.sync_bn,
        seed=getattr(args, "seed", FinetuneConfig.seed), checkpoint_interval=args.checkpoint_interval,
        resume=args.resume, progress=args.progress)


def loaders_from_args(args: argparse.Namespace, model: nn.Module) -> list[DataLoader]:
    """``[train, validation]`` loaders of ``--data`` at ``--img-size`` (default: what the model expects)."""
    img_size = model_img_size(model, args.data, args.img_size, DIGITS_IMG_SIZE)
    progress(f"reading {args.data} at {img_size}x{img_size}")
    workers = args.workers if args.workers is not None else (0 if args.data == DIGITS else 4)
    return [model_loader(model, args.data, split, args.batch_size, img_size=img_size, num_workers=workers)
            for split in ("train", "validation")]


def _summary(result: FinetuneResult) -> str:
    final = result.final
    return "\n".join([
        f"final: val acc {final['val_acc']:.2f}%, val loss {final['val_loss']:.4f}, train loss "
        f"{final['train_loss']:.4f}",
        f"best:  val acc {result.best_acc:.2f}% at epoch {result.best_epoch}",
        f"wrote {result.out_dir}/best.safetensors, last.safetensors, last.pt, metrics.jsonl, metrics.png",
    ])


def run(args: argparse.Namespace) -> int:
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
    result = finetune(model, *loaders, args.out, config_from_args(args))
    if is_primary():
        print(_summary(result))
    return 0
