"""Sweep the model zoo: ``plan`` + ``convert`` every timm and torchvision model, report coverage.

    python tools/zoo.py --timm --torchvision --workers 2 --report docs/coverage.md
    python tools/zoo.py --real --max-params 30e6 --img-size 32 --filter 'resnet*'

The default (meta) mode builds each model on the ``meta`` device, so no weights are
allocated, runs ``plan``, carries the plan through JSON (``to_dict`` -> ``json`` ->
``from_dict``), converts by the plan read back and checks that every non-stem weight layer
of the converted model carries an IC block. ``--real`` runs :func:`icrewrite.testing.check_conversion`
(eval equivalence with randomised norms, every IC site's weight applied to Dropout(BatchNorm(.))
of its input, backward) on every model within the parameter budget, at the smallest input it runs at.

Each model runs in a worker process with a timeout: a model that hangs or kills its
worker is recorded as a failure with its reason (the signal, when the worker was killed)
and the sweep goes on. A model whose builder needs real tensors is built on the CPU, up to
``CPU_BUILD_MAX_PARAMS`` parameters; a bigger one is stopped as it is built and recorded as
``skipped``. Results are appended to a JSON
lines file as they come, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import itertools
import json
import multiprocessing
import platform
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from icrewrite import convert
from icrewrite.files import atomic_path
from icrewrite.layers import ICWeightLayer
from icrewrite.registry import is_weight_layer
from icrewrite.rewrite import Options, Plan, analyse, make_plan
from icrewrite.testing import check_conversion

__all__ = ["Entry", "timm_entries", "torchvision_entries", "through_json", "meta_check", "real_check", "run_isolated",
           "read_results", "write_report", "main"]

Record = dict[str, Any]
SOURCES = ("timm", "torchvision")


@dataclass(frozen=True)
class Entry:
    """One model of the zoo: where it comes from, its name and its family (defining module)."""

    source: str  # "timm" | "torchvision"
    name: str
    family: str  # e.g. "timm.models.resnet"

    def key(self, mode: str) -> tuple[str, str, str]:
        return mode, self.source, self.name


def timm_entries(pattern: str = "*") -> list[Entry]:
    """Every ``timm.list_models()`` architecture matching ``pattern``; family = its entrypoint's module."""
    return [Entry("timm", name, timm.models.model_entrypoint(name).__module__)
            for name in timm.list_models() if fnmatch.fnmatchcase(name, pattern)]


def torchvision_entries(pattern: str = "*") -> list[Entry]:
    """torchvision's classification models (``list_models(module=torchvision.models)``)."""
    models = torchvision.models
    return [Entry("torchvision", name, models.get_model_builder(name).__module__)
            for name in models.list_models(module=models) if fnmatch.fnmatchcase(name, pattern)]


def build(entry: Entry, **kwargs: Any) -> nn.Module:
    """The model of ``entry`` with random weights, on the current default device."""
    if entry.source == "timm":
        return timm.create_model(entry.name, pretrained=False, **kwargs)
    return torchvision.models.get_model(entry.name, weights=None, **kwargs)


class OverCPUBudget(Exception):
    """A model that cannot be built on ``meta`` and has more parameters than a CPU build may allocate."""


# Parameters a CPU build may allocate when the meta build is impossible: beyond it the build and
# its initialisation take minutes and gigabytes (eva_giant, eva02_enormous); torchvision's
# regnet_y_128gf (644M) fits.
CPU_BUILD_MAX_PARAMS = 1e9


@contextlib.contextmanager
def parameter_budget(max_params: float) -> Iterator[None]:
    """Raise :class:`OverCPUBudget` as soon as the modules built inside have registered more than
    ``max_params`` parameters: before the model is initialised, so an over-budget build stops early."""
    registered = 0

    def count(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        nonlocal registered
        registered += param.numel() if param is not None else 0
        if registered > max_params:
            raise OverCPUBudget(f"builder needs real tensors and the model is over the CPU budget "
                                f"(> {max_params / 1e6:.0f}M parameters)")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()


class _LinspaceOnCPU(TorchFunctionMode):
    """``torch.linspace`` without a device runs on the CPU: builders take their drop-path rates
    from it with ``.item()`` or ``.tolist()`` (most timm models up to 1.0.2x), which a meta
    tensor cannot give. No weight is made by it, so the model stays on ``meta``."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def build_on_meta(entry: Entry, cpu_max_params: float = CPU_BUILD_MAX_PARAMS) -> tuple[nn.Module, str]:
    """The model on ``meta`` (drop-path rates computed on the CPU, :class:`_LinspaceOnCPU`), or on
    the CPU for the few builders that compute their configuration with other tensors
    (torchvision's RegNets call ``.tolist()``); and that device. A CPU build of more than
    ``cpu_max_params`` parameters is stopped with :class:`OverCPUBudget`."""
    try:
        with torch.device("meta"), _LinspaceOnCPU():
            return build(entry), "meta"
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        pass
    except (RuntimeError, TypeError) as err:  # ".item() cannot be called on meta tensors", torch.LongTensor(meta)
        if "meta" not in str(err):
            raise
    with parameter_budget(cpu_max_params):
        return build(entry), "cpu"


def _error(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for a report table."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:300]


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``, to group failures by cause."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


# --- the checks, run in worker processes -------------------------------------------------------

def through_json(the_plan: Plan) -> Plan:
    """``the_plan`` written as JSON and read back, which must give the same plan."""
    replayed = Plan.from_dict(json.loads(json.dumps(the_plan.to_dict())))
    if replayed != the_plan:
        raise ValueError("the plan read back from JSON differs from the plan written")
    return replayed


def meta_check(entry: Entry) -> Record:
    """Plan ``entry`` built on ``meta``, carry the plan through JSON and convert by the plan
    read back; every non-stem weight layer must get an IC.

    ``gaps`` lists the weight layers left without an IC block and why; the record's
    ``status`` is ``ok`` only when there are none.
    """
    model, device = build_on_meta(entry)
    analysis = analyse(model)
    the_plan = make_plan(model, Options(), analysis)
    converted = convert(model, plan=through_json(the_plan))
    stem = {n.target for n in the_plan.notes if n.kind == "stem"}
    sites = {e.target for e in the_plan.edits if e.action == "insert-ic"}
    layers = [name for name, m in converted.named_modules() if is_weight_layer(m)]
    reasons = {n.target: n.reason for n in the_plan.notes}
    gaps = {name: reasons.get(name, "no IC block after convert")
            for name in layers if name not in stem and not isinstance(converted.get_submodule(name), ICWeightLayer)}
    gaps.update({name: "planned IC block missing after convert" for name in sites - set(layers) - stem})
    return {
        "status": "ok" if not gaps else "gap",
        "device": device,
        "params": the_plan.params_before,
        "weight_layers": len(layers),
        "ic": len(sites),
        "stem": len(stem),
        "folded": the_plan.count("fold-norm") + the_plan.count("replace-norm-act"),
        "kept_norms": sum(n.kind == "kept-norm" for n in the_plan.notes),
        "scopes": len(analysis.scopes),
        "untraced_scopes": [s.prefix or "<model>" for s in analysis.scopes if s.graph is None],
        "unseen": sorted(name for name in sites
                         if not analysis.layers[name].called and analysis.layers[name].routed_by is None),
        "gaps": gaps,
    }


def _input_sizes(cfg: dict[str, Any], img_size: int) -> list[tuple[int, ...]]:
    """Input sizes to try, smallest first: ``img_size`` doubled while below the model's default
    ``input_size``, then the default. ``min_input_size`` is where pretrained weights stay accurate,
    not a limit (botnet26t_256 runs at 32x32), so it is not used."""
    channels, *default = tuple(cfg.get("input_size") or (3, 224, 224))
    sides = itertools.takewhile(lambda side: side < min(default), (img_size * 2**k for k in itertools.count()))
    return [(channels, side, side) for side in sides] + [(channels, *default)]


def input_config(entry: Entry, model: nn.Module) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of ``model``; for torchvision, the crop size of its default weights' transforms
    (inception_v3's auxiliary head, which runs in train mode only, needs its 299x299)."""
    if entry.source == "timm":
        return getattr(model, "pretrained_cfg", None) or {}
    crop = torchvision.models.get_model_weights(entry.name).DEFAULT.transforms().crop_size[0]
    return {"input_size": (3, crop, crop)}


def _runs_at(model: nn.Module, size: tuple[int, ...]) -> bool:
    """Whether ``model`` runs on a batch of ``size`` inputs in eval and in train mode (some heads run in one only)."""
    try:
        with torch.no_grad():
            for training in (False, True):
                model.train(training)(torch.zeros(2, *size))
        return True
    except Exception:
        return False


def small_inputs(entry: Entry, cfg: dict[str, Any], img_size: int) -> Iterator[tuple[nn.Module, tuple[int, ...]]]:
    """The model with random weights (seed 0) and each input size it runs at, smallest first (:func:`_input_sizes`).

    A model is built once and tried at each size, but one with a fixed input size (ViTs size
    their position embeddings, Swin its windows) is built for each size below its default.
    """
    sizes = _input_sizes(cfg, img_size)
    attempts = ([({"img_size": size[-1]}, [size]) for size in sizes[:-1]] + [({}, sizes[-1:])]
                if cfg.get("fixed_input_size") else [({}, sizes)])
    for kwargs, tried in attempts:
        torch.manual_seed(0)
        try:
            model = build(entry, **kwargs)
        except Exception:  # e.g. a builder without an img_size argument
            continue
        yield from ((model, size) for size in tried if _runs_at(model, size))


# What BatchNorm raises in training on one value per feature: some IC inputs do not grow with
# the batch (swinv2_cr's relative-position MLP reads one coordinate pair when its window is 1x1).
_ONE_VALUE_PER_FEATURE = "Expected more than 1 value per channel when training"


def real_check(entry: Entry, max_params: float = 30e6, img_size: int = 32, batch: int = 4) -> Record:
    """``check_conversion`` on real tensors for models of at most ``max_params`` parameters.

    The input is ``batch`` random images at the smallest size the model runs at (see
    :func:`small_inputs`) where no IC block gets a single value per feature; bigger models
    are recorded as ``skipped``, counted on ``meta``.
    """
    probe, _ = build_on_meta(entry)
    params = sum(p.numel() for p in probe.parameters())
    if params > max_params:
        return {"status": "skipped", "params": params, "reason": f"{params / 1e6:.1f}M parameters > budget"}
    reason = "the original model runs at no input size tried"
    for model, size in small_inputs(entry, input_config(entry, probe), img_size):
        torch.manual_seed(0)
        try:
            result = check_conversion(model, torch.randn(batch, *size))
        except ValueError as exc:
            if _ONE_VALUE_PER_FEATURE not in str(exc):
                raise
            reason = f"an IC block gets one value per feature at every input size tried ({_error(exc)})"
            continue
        return {"status": "ok" if result.ok else "fail", "params": params, "input_size": list(size),
                "sites": result.sites, "rel_error": result.rel_error, "rel_error_float64": result.rel_error_float64,
                "failures": result.failures[:20], "reason": "; ".join(result.failures[:3])[:500] or None}
    return {"status": "error", "params": params, "reason": reason}


def _run_one(check: Callable[..., Record], entry: Entry, kwargs: dict[str, Any]) -> Record:
    """Run ``check`` and turn any exception into an ``error`` record."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        record = check(entry, **kwargs)
    except OverCPUBudget as exc:  # not checked: recorded with its reason
        record = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a model that breaks the check is a result, not a crash of the sweep
        record = {"status": "error", "reason": _error(exc), "where": _where(exc)}
    return {**dataclasses.asdict(entry), **record, "seconds": round(time.perf_counter() - start, 3),
            "cpu_seconds": round(time.process_time() - cpu, 3)}


def _worker(conn: Connection, threads: int) -> None:
    """Worker loop: announce readiness, then answer each ``(check, entry, kwargs)`` with a record."""
    torch.set_num_threads(threads)
    conn.send(None)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(_run_one(*task))


def _death(exitcode: int) -> str:
    """How a worker ended: its exit code, or the signal that killed it (SIGKILL, where nothing in the
    sweep sends one, is most often the system's out-of-memory killer)."""
    if exitcode >= 0:
        return f"worker died (exit code {exitcode})"
    killer = signal.Signals(-exitcode)
    return f"worker killed by {killer.name}" + (" (out of memory?)" if killer == signal.SIGKILL else "")


# --- the process pool --------------------------------------------------------------------------

@dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    entry: Entry | None = None
    started: float = 0.0
    ready: bool = False


def run_isolated(check: Callable[..., Record], entries: Iterable[Entry], *, workers: int = 2,
                 timeout: float = 60.0, threads: int = 1, **kwargs: Any) -> Iterator[Record]:
    """Yield ``check(entry, **kwargs)`` records, each computed in a worker process.

    A model running past ``timeout`` seconds gets its worker killed and a ``timeout``
    record; a worker that dies (segfault, out of memory) gives a ``crash`` record. Either
    way a new worker takes its place and the sweep goes on. Records come in completion order.
    A worker that exits before it is ready (a broken import) stops the sweep with ``RuntimeError``;
    one killed by a signal then (out of memory while another worker builds) is replaced.
    """
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    pending = list(entries)
    pending.reverse()
    slots: list[_Slot] = []

    def spawn() -> _Slot:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def replace(slot: _Slot) -> None:
        slot.process.kill()
        slot.process.join()
        slot.conn.close()
        slots[slots.index(slot)] = spawn()

    def failed(slot: _Slot, status: str, reason: str) -> Record:
        assert slot.entry is not None
        return {**dataclasses.asdict(slot.entry), "status": status, "reason": reason,
                "seconds": round(time.perf_counter() - slot.started, 3)}

    try:
        slots.extend(spawn() for _ in range(min(workers, len(pending))))
        while any(s.entry is not None for s in slots) or pending:
            for slot in slots:
                if slot.ready and slot.entry is None and pending:
                    slot.entry, slot.started = pending.pop(), time.perf_counter()
                    slot.conn.send((check, slot.entry, kwargs))
            busy = [s for s in slots if s.entry is not None]
            waits = [timeout - (time.perf_counter() - s.started) for s in busy]
            signalled = wait([s.conn for s in slots] + [s.process.sentinel for s in slots],
                         timeout=max(0.0, min(waits)) if waits else None)
            for slot in list(slots):
                if slot.conn in signalled:
                    try:
                        message = slot.conn.recv()
                    except EOFError:  # died while sending: handled by its sentinel below
                        message = None
                    else:
                        slot.ready = True
                        if message is not None:
                            slot.entry = None
                            yield message
                            continue
                if slot.process.sentinel in signalled and not slot.process.is_alive():
                    if not slot.ready and slot.process.exitcode >= 0:  # not killed from outside: it cannot start
                        raise RuntimeError(f"a sweep worker failed to start ({_death(slot.process.exitcode)})")
                    if slot.entry is not None:
                        yield failed(slot, "crash", _death(slot.process.exitcode))
                    replace(slot)
                elif slot.entry is not None and time.perf_counter() - slot.started > timeout:
                    yield failed(slot, "timeout", f"no result within {timeout:g} s")
                    replace(slot)
    finally:
        for slot in slots:
            slot.process.kill()
            slot.process.join()
            slot.conn.close()


# --- results and the report --------------------------------------------------------------------

def read_results(path: Path) -> dict[tuple[str, str, str], Record]:
    """The records of a results file by ``(mode, source, name)``; a later line wins."""
    records: dict[tuple[str, str, str], Record] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["mode"], record["source"], record["name"]] = record
    return records


def _versions() -> str:
    return (f"timm {timm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}")


_PASSED = {"meta": ("ok",), "real": ("ok", "skipped")}
_SECTIONS = {
    "meta": "Meta sweep: `plan` + `convert` on the meta device\n\nEvery model is built on `meta` (no weights), "
            "planned, its plan carried through JSON and the model converted by the plan read back; it passes when "
            "every weight layer that does not read the model input has an IC block in the converted model. `gap` lists the layers left without one and why.",
    "real": "Real-tensor checks: `icrewrite.testing.check_conversion`\n\nEvery model within the parameter budget "
            "(`--max-params`) is built with random weights and randomised norms and checked on 4 random images at "
            "the smallest size it runs at (`--img-size`, doubled until the model runs in eval and train mode, else its "
            "default size; fixed-size models are built for each size): eval output preserved (in float64 where float32 "
            "rounding alone exceeds the tolerance), every IC site's weight applied to its IC block's output and that "
            "output Dropout(BatchNorm(input)) element by element at p=0.5, backward reaching every parameter. Models "
            "are taken one family at a time, so a partial sweep covers as many families as it can.",
}


def _failure_reason(record: Record) -> str:
    if record.get("gaps"):
        reasons = Counter(record["gaps"].values())
        first = ", ".join(sorted(record["gaps"])[:3])
        return f"{len(record['gaps'])} weight layers without IC ({first}): " + "; ".join(
            f"{count}x {reason}" for reason, count in reasons.most_common())
    return f"{record.get('reason')}" + (f" ({record['where']})" if record.get("where") else "")


def _tally(records: list[Record]) -> tuple[int, int, int]:
    """``(passed, failed, skipped)``: records that are ``ok``, that checked something and are not, and ``skipped``."""
    status = Counter(r["status"] for r in records)
    return status["ok"], len(records) - status["ok"] - status["skipped"], status["skipped"]


def _mode_section(mode: str, records: list[Record]) -> list[str]:
    """Markdown for one mode: totals, per-family table, every failure with its reason."""
    status = Counter(r["status"] for r in records)
    passed = [r for r in records if r["status"] in _PASSED[mode]]
    lines = [f"## {_SECTIONS[mode]}", ""]
    for source in SOURCES:
        mine = [r for r in records if r["source"] == source]
        if mine:
            ok, failed, skipped = _tally(mine)
            checked = ok + failed
            note = f"; {skipped} skipped" if skipped else ""
            lines.append(f"- {source}: **{ok} / {checked}** models pass ({100.0 * ok / max(checked, 1):.1f}%){note}")
    lines.append("- by status: " + ", ".join(f"{s} {n}" for s, n in status.most_common()))
    if mode == "meta":
        total = lambda key: sum(r.get(key, 0) for r in passed)
        lines += [
            f"- weight layers: {total('weight_layers'):,}; IC blocks inserted: {total('ic'):,}; stem layers "
            f"(no IC by default): {total('stem'):,}; BatchNorms folded: {total('folded'):,}; BatchNorms before "
            f"an activation kept: {total('kept_norms'):,}",
            f"- models with a scope torch.fx could not trace (handled module by module): "
            f"{sum(bool(r.get('untraced_scopes')) for r in records)}; IC blocks on layers no trace saw called: "
            f"{sum(len(r.get('unseen', ())) for r in records):,}",
        ]
    else:
        covered = [r for r in records if r["status"] != "skipped"]
        sizes = Counter("x".join(map(str, r["input_size"][1:])) for r in covered if r.get("input_size"))
        lines += [f"- checked: {len(covered)} models; input sizes used: "
                  + ", ".join(f"{s} ({n})" for s, n in sizes.most_common()),
                  f"- skipped (over the parameter budget): {status['skipped']}"]
    seconds = sum(r.get("seconds", 0.0) for r in records)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in records)
    lines += [f"- time in workers: {seconds:,.0f} s wall, {cpu:,.0f} s CPU ({cpu / max(len(records), 1):.2f} s per "
              f"model): about {cpu / 120:.1f} minutes on 2 dedicated cores", ""]

    families: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        families[record["family"]].append(record)
    lines += ["| family | models | pass | fail | skipped |", "| --- | ---: | ---: | ---: | ---: |"]
    for family in sorted(families):
        ok, failed, skipped = _tally(families[family])
        lines.append(f"| `{family}` | {ok + failed + skipped} | {ok} | {failed} | {skipped} |")
    failures = sorted((r for r in records if r["status"] not in _PASSED[mode]), key=lambda r: (r["family"], r["name"]))
    lines += ["", f"### Failures ({len(failures)})", ""]
    lines += [f"- `{r['name']}` ({r['source']}, {r['status']}): {_failure_reason(r)}" for r in failures] or ["None."]
    return lines + [""]


def write_report(records: Iterable[Record], path: Path, *, run_info: str) -> None:
    """Write the coverage report (markdown) for every mode present in ``records``."""
    by_mode: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_mode[record["mode"]].append(record)
    lines = ["# Model zoo coverage", "",
             f"Generated by `python tools/zoo.py` on {datetime.date.today().isoformat()} with {_versions()}.",
             "", run_info, ""]
    for mode in ("meta", "real"):
        if by_mode.get(mode):
            lines += _mode_section(mode, by_mode[mode])
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


# --- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/zoo.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/zoo.py --timm --workers 2 --report docs/coverage.md\n"
               "  python tools/zoo.py --real --filter 'resnet*' --max-params 30e6 --img-size 32")
    parser.add_argument("--timm", action="store_true", help="sweep timm.list_models() (default: both sources)")
    parser.add_argument("--torchvision", action="store_true", help="sweep torchvision's classification models")
    parser.add_argument("--filter", nargs="+", default=["*"], metavar="PATTERN",
                        help="fnmatch patterns on model names; a model matching any is swept (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per model before it counts as hung")
    parser.add_argument("--results", type=Path, default=Path("runs/zoo.jsonl"),
                        help="JSON lines file the results are appended to; models already in it are skipped")
    parser.add_argument("--real", action="store_true", help="real-tensor checks instead of the meta sweep")
    parser.add_argument("--max-params", type=float, default=30e6, help="--real: parameter budget (default 30e6)")
    parser.add_argument("--img-size", type=int, default=32,
                        help="--real: smallest input side tried, doubled until the model runs (default 32)")
    parser.add_argument("--report", type=Path, help="write the markdown coverage report here (e.g. docs/coverage.md)")
    return parser


def interleave_families(entries: list[Entry]) -> list[Entry]:
    """One model of each family in turn, so that a partial sweep covers as many families as it can."""
    families: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        families[entry.family].append(entry)
    queues = list(families.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sources = [s for s in SOURCES if getattr(args, s)] or list(SOURCES)
    mode = "real" if args.real else "meta"
    listings = {"timm": timm_entries, "torchvision": torchvision_entries}
    entries = list(dict.fromkeys(e for source in sources for pattern in args.filter for e in listings[source](pattern)))
    done = read_results(args.results)
    todo = [e for e in entries if e.key(mode) not in done]
    if args.real:
        todo = interleave_families(todo)
        check, kwargs = real_check, {"max_params": args.max_params, "img_size": args.img_size}
    else:
        check, kwargs = meta_check, {}
    start = time.perf_counter()
    failed = 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as out, tqdm(total=len(todo), desc=f"{mode} sweep", unit="model") as bar:
        for record in run_isolated(check, todo, workers=args.workers, timeout=args.timeout, **kwargs):
            record["mode"] = mode
            out.write(json.dumps(record) + "\n")
            out.flush()
            done[mode, record["source"], record["name"]] = record
            failed += record["status"] not in (*_PASSED[mode], "skipped")
            bar.set_postfix_str(f"{record['name']}: {record['status']}", refresh=False)
            bar.update()
    wall = time.perf_counter() - start
    print(f"{mode}: {len(todo)} models in {wall:.0f} s ({len(entries) - len(todo)} already in {args.results})",
          file=sys.stderr)
    if args.report:
        info = (f"Last run ({mode}): {len(todo)} models in {wall:,.0f} s wall time on {args.workers} workers "
                f"({multiprocessing.cpu_count()} CPUs, shared with other work); results file `{args.results}`."
                if todo else f"Report written from the results in `{args.results}`.")
        write_report(done.values(), args.report, run_info=info)
    if failed:
        print(f"{mode}: {failed} of {len(todo)} models did not pass", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
