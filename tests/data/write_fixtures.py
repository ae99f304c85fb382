"""Write the fixture checkpoints and pickles in this folder (run once; kept as their provenance).

They were written by icrewrite 0.1.0 at commit c58aa47, before plans were stored in
checkpoints and before the package was split into sub-packages, with torch 2.14.1 and
timm 1.0.31. Tests load them with today's code and compare with what the writing model
recorded in ``expected/``: state dict, module classes, and the eval output on a seeded input.
Do not regenerate them: they stand for files that users already have.

``python write_fixtures.py plans`` wrote ``plans/*.json``: schema-1 plans (``Plan.to_dict()``
of icrewrite 0.1.0 at commit 80ae67c, torch 2.14.1, timm 1.0.31) of the models and options
of ``tests/test_plans.py`` (``CASES``, built by its ``build``): folded BatchNorms, a fused
BatchNormAct2d, the three kinds of attention reroute, the residual-unit layouts, every form
of activation statistics. test_plans.py reads them with today's code and replays them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import safetensors.torch
import timm
import torch

import icrewrite
from icrewrite.testing import randomize_norms

HERE = Path(__file__).resolve().parent
# name -> (timm architecture, create_model kwargs, convert options, file or folder, input size)
FIXTURES = {
    "byobnet": ("test_byobnet", {"num_classes": 10}, {}, "byobnet.safetensors", (3, 64, 64)),
    "efficientnet": ("test_efficientnet", {"num_classes": 10}, {"p": 0.1, "head": False}, "efficientnet", (3, 64, 64)),
    "vit": ("test_vit", {"num_classes": 10}, {"exclude": ["blocks.0.*"]}, "vit.safetensors", (3, 160, 160)),
}


def seeded_input(size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn((2, *size), generator=torch.Generator().manual_seed(0))


def main() -> None:
    (HERE / "expected").mkdir(exist_ok=True)
    for name, (arch, kwargs, options, target, size) in FIXTURES.items():
        torch.manual_seed(0)
        model = randomize_norms(timm.create_model(arch, pretrained=False, **kwargs), seed=1).eval()
        converted = icrewrite.convert(model, **options).eval()
        with torch.no_grad():
            output = converted(seeded_input(size))
        icrewrite.save(converted, HERE / target, force=True)
        torch.save(converted, HERE / f"{name}.model.pt")  # a whole pickled model, as users save them
        tensors = {f"state.{k}": v.contiguous() for k, v in converted.state_dict().items()}
        safetensors.torch.save_file({**tensors, "output": output}, HERE / "expected" / f"{name}.safetensors")
        classes = {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in converted.named_modules()}
        record = {"architecture": arch, "create_kwargs": kwargs, "options": options, "file": target,
                  "input_size": list(size), "classes": classes, "versions": {
                      "icrewrite": icrewrite.__version__, "torch": torch.__version__, "timm": timm.__version__}}
        (HERE / "expected" / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


def write_plans() -> None:
    """Each case of tests/test_plans.py planned by this icrewrite, as ``plans/<case>.json``."""
    sys.path.insert(0, str(HERE.parent))
    from test_plans import CASES, build

    (HERE / "plans").mkdir(exist_ok=True)
    for case, (name, options) in CASES.items():
        data = icrewrite.plan(build(name), **options).to_dict()
        (HERE / "plans" / f"{case}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    write_plans() if sys.argv[1:] == ["plans"] else main()
