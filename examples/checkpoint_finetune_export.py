"""From a saved checkpoint to a deployable ONNX file with the command line.

The three commands it runs (printed before each step) are the whole workflow:

    icrewrite convert resnet18 --checkpoint weights.pth --num-classes 10 -o resnet18_ic.safetensors --verify
    icrewrite finetune resnet18_ic.safetensors --data digits --epochs 3 -o run
    icrewrite export run/best.safetensors -o resnet18_ic.onnx --input-size 3 32 32

    python examples/checkpoint_finetune_export.py --work /tmp/icrewrite-example
    python examples/checkpoint_finetune_export.py --tiny   # a tiny ResNet, one short epoch
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import timm
import torch

from icrewrite.cli import main as icrewrite_main
from icrewrite.testing import randomize_norms


def icrewrite(*args: str) -> None:
    """Run one ``icrewrite`` command (the command line's own entry point, in this process)."""
    print(f"\n$ icrewrite {shlex.join(args)}", flush=True)
    if icrewrite_main(list(args)) != 0:
        sys.exit(f"icrewrite {args[0]} failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the files (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="timm's resnet10t, 16x16 images, one epoch")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="icrewrite-example-"))
    name, size, epochs = ("resnet10t", 16, 1) if args.tiny else ("resnet18", 32, 3)

    # Stand-in for the checkpoint you bring: a timm model's weights saved as a .pth state dict.
    model = randomize_norms(timm.create_model(name, num_classes=10))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), work / "weights.pth")

    icrewrite("convert", name, "--checkpoint", str(work / "weights.pth"), "--num-classes", "10",
              "-o", str(work / f"{name}_ic.safetensors"), "--verify", "--force")
    icrewrite("finetune", str(work / f"{name}_ic.safetensors"), "--data", "digits", "--img-size", str(size),
              "--epochs", str(epochs), "-o", str(work / "run"), "--resume")
    icrewrite("export", str(work / "run" / "best.safetensors"), "-o", str(work / f"{name}_ic.onnx"),
              "--input-size", "3", str(size), str(size), "--force")
    print(f"\nfiles in {work}: {', '.join(sorted(p.name for p in work.iterdir()))}")


if __name__ == "__main__":
    main()
