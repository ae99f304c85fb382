"""The version matrix: the default test suite and a small zoo sample on each torch/timm pair.

    pip install nox
    nox -l                                  # the sessions
    nox -s "matrix(torch=2.11.0, timm=1.0.31)"
    nox                                     # all of them (about 15 minutes each on 2 cores)

Not run in CI (time); run it before a release or a change of the declared ranges, and
record the table in docs/compatibility.md. Each session gets a fresh virtual environment
with exactly the pinned torch, torchvision and timm.
"""
from __future__ import annotations

import nox

# (torch, torchvision, timm): the newest tested, the declared floors (torch 2.8), and torch 2.11,
# what the GPU machines run (older torch is not declared: see docs/compatibility.md).
MATRIX = [
    ("2.14.1", "0.29.1", "1.0.31"),
    ("2.14.1", "0.29.1", "1.0.20"),
    ("2.14.1", "0.29.1", "1.0.15"),
    ("2.14.1", "0.29.1", "1.0.9"),
    ("2.11.0", "0.26.0", "1.0.31"),
    ("2.11.0", "0.26.0", "1.0.9"),
    ("2.8.0", "0.23.0", "1.0.31"),
]

# One model of each kind the engine handles: plain ResNet, fused BatchNormAct, depthwise
# convs, a ViT, a rerouted timm attention, torchvision's Swin and MultiheadAttention.
ZOO_SAMPLE = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "vit_tiny_patch16_224", "convnext_atto",
              "eva02_tiny_patch14_224", "swin_t", "vit_b_16"]

nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
@nox.parametrize("torch, torchvision, timm", MATRIX, ids=[f"torch={t}, timm={m}" for t, _, m in MATRIX])
def matrix(session: nox.Session, torch: str, torchvision: str, timm: str) -> None:
    pins = [f"torch=={torch}", f"torchvision=={torchvision}", f"timm=={timm}"]
    constraints = session.create_tmp() + "/constraints.txt"
    with open(constraints, "w") as f:
        f.write("\n".join(pins) + "\n")
    session.install(*pins)
    session.install("-c", constraints, "-e", ".[test]")
    session.run("python", "-c", "import torch, timm, icrewrite; print('torch', torch.__version__, 'timm', "
                "timm.__version__, 'icrewrite', icrewrite.__version__)")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
    session.run("python", "tools/zoo.py", "--workers", "1", "--filter", *ZOO_SAMPLE,
                "--results", f"{session.create_tmp()}/zoo.jsonl")
