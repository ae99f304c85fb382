"""onnxruntime CPU latency of an exported IC model relative to the exported original.

For each model: a timm model (random weights, norms randomised) and its conversion by
``icrewrite.convert`` (the graph's cost does not depend on the IC statistics). The
original and the converted model are exported by ``export_onnx`` with the same exporter
at batch 1, the converted one three ways: folded (the default), folded with border
corrections (``border_correction=True``) and unfolded (``fold=False``). The sessions run
interleaved in one process, in alternating order; each round times one run of each, and
the reported ratio is the median over rounds of ``t(IC) / t(original)`` from the same
round, which cancels the load drift of a shared machine. It is a benchmark, not a test:
nothing is asserted.

    python benchmarks/onnx_latency.py                  # resnet50, mobilenetv3_large_100, efficientnet_b0
    python benchmarks/onnx_latency.py --quick          # resnet18 at 64x64, a few rounds
    python benchmarks/onnx_latency.py --models mobilenetv3_large_100 --exclude '*conv_dw'
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from tqdm import tqdm

import icrewrite
from icrewrite.deploy.onnx import EXPORTERS, export_onnx
from icrewrite.testing import randomize_norms
from machine import cpu_name  # benchmarks/machine.py, beside this script

MODELS = ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")
# export_onnx options of each exported graph
VARIANTS: dict[str, dict[str, bool]] = {
    "original": {},
    "folded": {},
    "border-corrected": {"border_correction": True},
    "unfolded": {"fold": False},
}


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_variants(name: str, size: int, exporter: str, exclude: list[str], folder: Path) -> dict[str, Path]:
    """Export the original model and the ``VARIANTS`` of its IC conversion with one exporter."""
    original = randomize_norms(timm.create_model(name, pretrained=False), seed=0).eval()
    converted = icrewrite.convert(original, exclude=exclude)
    paths = {}
    for variant, options in VARIANTS.items():
        paths[variant] = folder / f"{name}-{variant}.onnx"
        model = original if variant == "original" else converted
        report = export_onnx(model, paths[variant], input_size=(3, size, size), dynamic_batch=False,
                             exporters=(exporter,), **options)
        if report.fold and variant != "original":
            print(f"{name} {variant}: {report.fold.summary()}")
    return paths


def time_interleaved(sessions: dict[str, onnxruntime.InferenceSession], x: np.ndarray, rounds: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each session, one run each per round, alternating the order."""
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_index in tqdm(range(rounds), desc="rounds", leave=False):
        for name in order if round_index % 2 == 0 else reversed(order):
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return times


def paired_median_ratio(times: list[float], baseline: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(times, baseline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="exporter for all three graphs (default torchscript: same graphs, faster export)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="convert with this exclude pattern (repeatable), e.g. '*conv_dw'")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64x64, 20 rounds: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.rounds, args.warmup = ["resnet18"], 64, 20, 2
    torch.set_num_threads(1)

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
          f"icrewrite {icrewrite.__version__}, python {platform.python_version()}")
    if args.exclude:
        print(f"converted with exclude={args.exclude}")
    print(f"{cpu_name()}, {args.threads} thread(s), input 1x3x{args.size}x{args.size}, exporter {args.exporter}, "
          f"{args.rounds} rounds (median of paired per-round ratios)")
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            paths = export_variants(name, args.size, args.exporter, args.exclude, Path(folder))
            sessions = {variant: session(path, args.threads) for variant, path in paths.items()}
            times = time_interleaved(sessions, x, args.rounds, args.warmup)
            ratios = [paired_median_ratio(times[v], times["original"]) for v in list(VARIANTS)[1:]]
            rows.append(f"| {name} | {1000 * statistics.median(times['original']):.2f} | "
                        + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    print("\n| model | original (ms) | " + " | ".join(f"IC {v} / original" for v in list(VARIANTS)[1:])
          + " |\n|---|---|" + "---|" * (len(VARIANTS) - 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
