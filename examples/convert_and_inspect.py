"""Convert a timm model in Python, inspect the plan, and check that the function is kept.

    python examples/convert_and_inspect.py --model resnet50
    python examples/convert_and_inspect.py --tiny        # a tiny ResNet, a few seconds
"""
from __future__ import annotations

import argparse

import timm
import torch

import icrewrite
from icrewrite.layers import ICWeightLayer, ic_base
from icrewrite.testing import randomize_norms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="any timm model name (default resnet50)")
    parser.add_argument("--tiny", action="store_true", help="use timm's resnet10t at 32x32 instead")
    args = parser.parse_args(argv)
    name, size = ("resnet10t", 32) if args.tiny else (args.model, None)

    model = timm.create_model(name, pretrained=False)
    randomize_norms(model)  # stands in for trained weights: BatchNorm statistics far from their defaults
    size = size or model.pretrained_cfg["input_size"][-1]

    print(icrewrite.plan(model))  # what convert will do, module by module; nothing changes yet

    ic_model = icrewrite.convert(model)  # same class, same function in eval mode
    print(icrewrite.verify(model, ic_model, torch.randn(2, 3, size, size)))

    layer_name, layer = next((n, m) for n, m in ic_model.named_modules() if isinstance(m, ICWeightLayer))
    print(f"\n{layer_name} is now {type(layer).__name__}, still a {ic_base(type(layer)).__name__} "
          f"(isinstance: {isinstance(layer, ic_base(type(layer)))}); its input passes through\n  {layer.ic}")
    print(f"conversion options recorded on the model: {icrewrite.rewrite.options_of(ic_model)}")


if __name__ == "__main__":
    main()
