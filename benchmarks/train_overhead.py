"""Training cost of an IC model relative to the original: step time and memory.

For each model: a timm model (random weights) and its ``icrewrite.convert`` conversion,
trained with the same step (forward, cross-entropy, backward, SGD with momentum) on the
same random batch. Three variants: ``original``, ``IC`` (the fast IC path of
``icrewrite.layers.fast``, the default; on CUDA labelled with the CUDA path in force,
``--cuda-path``) and ``IC reference`` (``IC.fast = False``: the BatchNorm + Dropout modules,
which ``torch.compile`` traces and Inductor fuses); ``--variants`` keeps some of them. With
``--compile`` each variant is also timed wrapped in ``torch.compile``. With ``--floors``, three
models that are not IC networks bound the cost from below: the conversion with its IC
blocks without dropout (training-mode BatchNorm: what any IC block does before it draws and
applies a mask), in eval mode (one normalisation pass with fixed statistics and its
backward: less work than any training-mode IC block, whatever its kernels) and removed.

Time: the variants run interleaved in one process, one step each per round, in
alternating order; the ratio is the median over rounds of ``t(IC) / t(original)`` from
the same round, which cancels the load drift of a shared machine. On CPU both wall time
and process CPU time are reported (CPU time leaves out the waits for a loaded machine's
cores; with one thread it is the cleaner cost measure). On CUDA, wall time after
synchronising.

Memory: the bytes of the tensors autograd saves for backward in one step (seen through
``torch.autograd.graph.saved_tensors_hooks``, counted once per storage): the activation
memory that sets the peak of a training step. ``peak est.`` adds the model state that
lives through the step (parameters, gradients, momentum). ``measured peak`` is the peak
of a step as the machine sees it, temporaries included: on CUDA
``torch.cuda.max_memory_allocated``; on Linux CPUs, in a fresh process where glibc hands
freed blocks of 64 KiB and more back at once (so that the resident set follows the live
tensors), how far a step raises the resident set (``VmHWM``, reset before the step, over
``VmRSS``) plus the model state. It is a benchmark, not a test: nothing is asserted.

    python benchmarks/train_overhead.py                       # resnet18, resnet50, efficientnet_b0, vit_tiny
    python benchmarks/train_overhead.py --models resnet50 --compile
    python benchmarks/train_overhead.py --models resnet50 --floors  # with the floors of the IC cost
    python benchmarks/train_overhead.py --quick               # a tiny smoke run
    python benchmarks/train_overhead.py --models resnet50 --batch 128 --size 224 --amp bf16 --channels-last --compile
    python benchmarks/train_overhead.py --device cuda --models resnet50 --variants fast --cuda-path triton
    python benchmarks/train_overhead.py --models demo --size 32 --batch 64 --threads 2  # the demo's model
    python benchmarks/train_overhead.py --models mobilenetv3_small_100 --size 64 --batch 32 --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import icrewrite
from icrewrite.layers import IC
from icrewrite.apps.demo import FULL as DEMO
from icrewrite.layers import fast as fast_ic
from machine import cpu_name  # benchmarks/machine.py, beside this script

MODELS = ("resnet18", "resnet50", "efficientnet_b0", "vit_tiny_patch16_224")
BASELINE = "original"
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Variant:
    """A model and its optimizer, trained by :meth:`step` (under autocast to ``amp`` where given)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    amp: torch.dtype | None = None

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(x.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with autocast:
            return F.cross_entropy(self.model(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss(x, y).backward()
        self.optimizer.step()


def create(name: str, size: int) -> nn.Module:
    """``timm.create_model(name)`` for ``size`` x ``size`` inputs (``img_size`` for models that take it);
    ``demo`` is the model that ``icrewrite demo`` trains (10 classes)."""
    if name == "demo":
        return timm.create_model(DEMO.model, pretrained=False, num_classes=10, **DEMO.model_args)
    try:
        return timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:  # convolutional networks take any input size and no img_size argument
        return timm.create_model(name, pretrained=False)


def with_ic_blocks(model: nn.Module, role: str) -> nn.Module:
    """``model`` (converted) with every IC block in a ``role``: ``reference`` (the BatchNorm
    and Dropout modules), or one of the floors: ``no dropout`` (training-mode BatchNorm, no mask),
    ``eval`` (normalisation by the running statistics, no batch statistics, no mask: less work
    than any train-mode IC block) and ``removed`` (the identity: what the conversion's other
    edits cost)."""
    for block in model.modules():
        if isinstance(block, IC):
            block.fast = False  # the modules' own forward, which the roles below change
            if role == "no dropout":
                block.drop.eval()
            elif role == "eval":
                block.norm.eval()
                block.drop.eval()
            elif role == "removed":
                block.norm, block.drop = nn.Identity(), nn.Identity()
    return model


def fast_label(device: torch.device) -> str:
    """The label of the fast-path variant: on CUDA it names the CUDA path in force (``fast.cuda_path``)."""
    return f"IC ({fast_ic.cuda_path()})" if device.type == "cuda" else "IC"


def variants(name: str, size: int, device: torch.device, compiled: bool, floors: bool = False,
             amp: torch.dtype | None = None, channels_last: bool = False,
             only: list[str] | None = None) -> dict[str, Variant]:
    """The original model, its IC conversion (fast path) and the IC reference path; with ``floors``
    also the conversion with its IC blocks without dropout, in eval mode and removed (see :func:`with_ic_blocks`).
    Trained under autocast to ``amp`` where given, in channels-last memory format with ``channels_last``.
    ``only`` keeps the original and the variants it names (``fast`` for the fast path, ``reference``)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original = create(name, size).to(device, memory_format=memory_format).train()
    converted = icrewrite.convert(original)
    wanted = set(only or ("fast", "reference"))
    models = {BASELINE: original}
    if "fast" in wanted:
        models[fast_label(device)] = converted
    if "reference" in wanted:
        models["IC reference"] = with_ic_blocks(copy.deepcopy(converted), "reference")
    if floors:
        models["floor: IC blocks without dropout"] = with_ic_blocks(copy.deepcopy(converted), "no dropout")
        models["floor: IC blocks in eval mode"] = with_ic_blocks(copy.deepcopy(converted), "eval")
        models["floor: IC blocks removed"] = with_ic_blocks(copy.deepcopy(converted), "removed")
    if compiled:
        models = {label: torch.compile(model) for label, model in models.items()}
    return {label: Variant(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), amp)
            for label, model in models.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs: dict[str, Variant], x: torch.Tensor, y: torch.Tensor, rounds: int,
                     warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per step of each variant, one step each per round, alternating the order."""
    for _ in range(warmup):
        for run in runs.values():
            run.step(x, y)
    synchronize(x.device)
    times: dict[str, dict[str, list[float]]] = {label: {"wall": [], "cpu": []} for label in runs}
    order = list(runs)
    for round_index in range(rounds):
        for label in order if round_index % 2 == 0 else reversed(order):
            wall, cpu = time.perf_counter(), time.process_time()
            runs[label].step(x, y)
            synchronize(x.device)
            times[label]["wall"].append(time.perf_counter() - wall)
            times[label]["cpu"].append(time.process_time() - cpu)
    return times


def saved_bytes(run: Variant, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the storages autograd saves for backward in one training step, each storage once."""
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run.forward_loss(x, y)
    loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return sum(storages.values())


def state_bytes(model: nn.Module) -> int:
    """Parameters, their gradients and SGD momentum: the model state alive through a step."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def cuda_peak_bytes(run: Variant, x: torch.Tensor, y: torch.Tensor) -> int:
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    run.step(x, y)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def follow_live_memory() -> bool:
    """Make glibc hand freed blocks of 64 KiB and more back at once, so that the resident set
    follows the live tensors; whether the resident-set peak of a step can be measured here (Linux, glibc)."""
    if not Path("/proc/self/clear_refs").exists():
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 16))
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def resident_step_bytes(run: Variant, x: torch.Tensor, y: torch.Tensor) -> int:
    """How far one train step raises the resident set above where it was before the step."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    run.step(x, y)
    return _status_bytes("VmHWM") - before


def sample_batch(args: argparse.Namespace, runs: dict[str, Variant], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input batch and its labels (the same for every call: the generator is seeded)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, runs[BASELINE].model.num_classes, (args.batch,), generator=generator).to(device)
    return x, y


def paired_median_ratio(times: list[float], baseline: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(times, baseline))


def quartiles(times: list[float], baseline: list[float]) -> str:
    """The first and third quartile of the per-round ratios."""
    q1, _, q3 = statistics.quantiles([t / b for t, b in zip(times, baseline)], n=4)
    return f"{q1:.2f}-{q3:.2f}"


@dataclass
class Measured:
    """One model in one mode: per-round step times and memory of each variant."""

    times: dict[str, dict[str, list[float]]]
    saved: dict[str, int]
    state: dict[str, int]
    peak: dict[str, int] | None  # the measured peak of a step, model state included


def measure(name: str, args: argparse.Namespace, device: torch.device, compiled: bool) -> Measured:
    """Times and memory of the variants of one model in one mode (eager or compiled)."""
    runs = variants(name, args.size, device, compiled, args.floors, AMP.get(args.amp), args.channels_last,
                    args.variants)
    x, y = sample_batch(args, runs, device)
    times = time_interleaved(runs, x, y, args.rounds, args.warmup)
    saved = {label: saved_bytes(run, x, y) for label, run in runs.items()}
    state = {label: state_bytes(run.model) for label, run in runs.items()}
    peak = {label: cuda_peak_bytes(run, x, y) for label, run in runs.items()} if device.type == "cuda" else None
    return Measured(times, saved, state, peak)


def measure_resident_peaks(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Per model and variant, the measured peak of an eager CPU step: its resident-set rise plus
    its model state. Empty where that cannot be measured; changes this process's allocator."""
    if not follow_live_memory():
        return {}
    peaks = {}
    for name in args.models:
        runs = variants(name, args.size, torch.device("cpu"), compiled=False, floors=args.floors,
                        amp=AMP.get(args.amp), channels_last=args.channels_last, only=args.variants)
        x, y = sample_batch(args, runs, torch.device("cpu"))
        for run in runs.values():
            run.step(x, y)  # momentum buffers exist from here on
        peaks[name] = {label: state_bytes(run.model) + min(resident_step_bytes(run, x, y) for _ in range(2))
                       for label, run in runs.items()}
        del runs
    return peaks


def resident_peaks(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """:func:`measure_resident_peaks` in a fresh process (``--resident-peaks``), which has the allocator to itself."""
    command = [sys.executable, __file__, "--resident-peaks", "--models", *args.models, "--batch", str(args.batch),
               "--size", str(args.size), "--threads", str(args.threads), *(["--floors"] if args.floors else []),
               *(["--amp", args.amp] if args.amp else []), *(["--channels-last"] if args.channels_last else []),
               *(["--variants", *args.variants] if args.variants else [])]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def rows(name: str, mode: str, measured: Measured, device: torch.device) -> list[str]:
    """Markdown table rows for one model in one mode."""
    times, saved, state, peak = measured.times, measured.saved, measured.state, measured.peak
    result = []
    for label in times:
        if label == BASELINE:
            continue
        ratio = {clock: paired_median_ratio(times[label][clock], times[BASELINE][clock]) for clock in ("wall", "cpu")}
        cells = [
            name, mode, label, f"{1000 * statistics.median(times[BASELINE]['wall']):.0f}",
            f"{ratio['wall']:.3f}", f"{ratio['cpu']:.3f}" if device.type == "cpu" else "-",
            f"{saved[label] / saved[BASELINE]:.3f}",
            f"{(saved[label] + state[label]) / (saved[BASELINE] + state[BASELINE]):.3f}",
            f"{peak[label] / peak[BASELINE]:.3f}" if peak else "-",
            quartiles(times[label]["wall"], times[BASELINE]["wall"]),
        ]
        result.append("| " + " | ".join(cells) + " |")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help="timm model names; 'demo' is the model 'icrewrite demo' trains (run it at 32x32, batch 64)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd variants")
    parser.add_argument("--compiled-only", action="store_true", help="time the torch.compile'd variants only")
    parser.add_argument("--floors", action="store_true",
                        help="also time the conversion with its IC blocks without dropout, in eval mode and removed: "
                             "what any IC implementation costs at least, and what the other edits cost")
    parser.add_argument("--amp", choices=sorted(AMP), help="train under autocast to this dtype")
    parser.add_argument("--channels-last", action="store_true", help="model and batch in channels-last memory format")
    parser.add_argument("--variants", nargs="+", choices=("fast", "reference"),
                        help="IC variants to time against the original (default both): 'fast' (the fast path; on CUDA "
                             "the CUDA path in force) and 'reference' (the BatchNorm and Dropout modules)")
    parser.add_argument("--cuda-path", choices=fast_ic.CUDA_PATHS,
                        help="what IC blocks run on CUDA (icrewrite.layers.fast.set_cuda_path; default: "
                             "ICREWRITE_CUDA_IC, else the reference)")
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 2 at 32x32, two rounds: checks the script runs")
    parser.add_argument("--resident-peaks", action="store_true", help=argparse.SUPPRESS)  # the child of resident_peaks
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size, args.rounds, args.warmup = ["resnet18"], 2, 32, 2, 1
    torch.set_num_threads(args.threads)
    if args.cuda_path:
        fast_ic.set_cuda_path(args.cuda_path)
    if args.resident_peaks:
        print(json.dumps(measure_resident_peaks(args)))
        return
    device = torch.device(args.device)

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, timm {timm.__version__}, icrewrite {icrewrite.__version__}, "
          f"python {platform.python_version()}")
    print(f"{hardware} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), {args.threads} thread(s); "
          f"train step (forward, backward, SGD) batch {args.batch} at {args.size}x{args.size}"
          f"{f', {args.amp} autocast' if args.amp else ''}{', channels-last' if args.channels_last else ''}; "
          f"{args.rounds} rounds, median of paired per-round ratios"
          f"{f'; CUDA path {fast_ic.cuda_path()}' if device.type == 'cuda' else ''}")
    modes = (True,) if args.compiled_only else (False, True) if args.compile else (False,)
    results = {(name, compiled): measure(name, args, device, compiled) for name in args.models for compiled in modes}
    if device.type == "cpu" and not args.compiled_only:
        for name, peaks in resident_peaks(args).items():
            results[name, False].peak = peaks
    print("\n| model | mode | variant | original step (ms) | time ratio (wall) | time ratio (CPU) "
          "| saved-activation ratio | peak est. ratio | measured peak ratio | wall ratio q1-q3 |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for (name, compiled), measured in results.items():
        for row in rows(name, "compiled" if compiled else "eager", measured, device):
            print(row)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
