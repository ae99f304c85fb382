"""Does IC help on your data? Train a timm model and its IC version on your ImageFolder.

DIR holds one sub-folder of images per class, either directly (a fixed 80/20 split is
made) or under train/ and val/. Per seed both models start from the same weights and see
the same batches; the script prints the table with 95% intervals over seeds and the
verdict, and writes OUT/report.md, OUT/compare.json and OUT/compare.png.

    python examples/compare_on_imagefolder.py ~/data/flowers --model resnet18 --epochs 10
    python examples/compare_on_imagefolder.py DIR --tiny    # a tiny ResNet at 16x16, 2 seeds of one epoch
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm

from icrewrite.train.data import make_loader, num_classes
from icrewrite.train.compare import compare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DIR", help="an ImageFolder directory")
    parser.add_argument("--model", default="resnet18", help="a timm model name (default resnet18)")
    parser.add_argument("--img-size", type=int, default=64, help="image size (default 64)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--p", type=float, default=0.05, help="dropout probability of the IC blocks")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model (default 3)")
    parser.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="timm's resnet10t at 16x16, 2 seeds of one epoch")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.img_size, args.epochs, args.seeds = "resnet10t", 16, 1, 2
    out = args.out or Path(tempfile.mkdtemp(prefix="icrewrite-compare-"))

    train = make_loader(args.data, "train", args.batch_size, args.img_size)
    val = make_loader(args.data, "validation", args.batch_size, args.img_size)
    classes = num_classes(train.dataset)
    comparison = compare(lambda: timm.create_model(args.model, num_classes=classes), train, val, out,
                         variants=["baseline", f"ic:p={args.p}"], seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                         progress=False)
    print(comparison.table())
    print("\n".join(comparison.verdicts().values()))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
