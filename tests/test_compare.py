"""``icrewrite compare``: the statistics, the variant specs, pairing, resume and the command line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.utils.data import DataLoader, Subset

import icrewrite
import icrewrite.train.compare as compare_module
from icrewrite.checkpoint import create_timm_model
from icrewrite.train.compare import Comparison, ComparisonError, compare, parse_variant, parse_variants
from icrewrite.train.data import DigitsDataset
from icrewrite.train.significance import (epochs_to, holm, median_ratio, paired_difference, seeds_needed,
                                         t_interval)
from nets import TINY
from test_data import write_digits_folder
from test_examples import subprocess_env


# -- statistics ---------------------------------------------------------------------------------

BASE = [97.5, 98.1, 98.6, 97.2, 98.3]


def test_a_known_difference_is_called_better_or_worse() -> None:
    rng = np.random.default_rng(0)
    up = [b + 1.0 + e for b, e in zip(BASE, rng.normal(0, 0.1, len(BASE)))]
    down = [b - 1.0 + e for b, e in zip(BASE, rng.normal(0, 0.1, len(BASE)))]
    assert paired_difference(up, BASE).verdict == "better"
    assert paired_difference(down, BASE).verdict == "worse"
    assert paired_difference(down, BASE, higher_is_better=False).verdict == "better"  # e.g. a loss
    assert paired_difference(up, BASE).interval.low > 0


def test_identical_runs_are_not_resolved() -> None:
    difference = paired_difference(BASE, BASE)
    assert difference.verdict == "not resolved at 5 seeds"
    assert difference.interval.mean == difference.interval.low == difference.interval.high == 0
    assert difference.seeds_needed is None
    assert "no number of seeds" in difference.explain()


def test_one_seed_is_never_resolved_and_has_no_interval() -> None:
    difference = paired_difference([99.0], [90.0])
    assert difference.verdict == "not resolved at 1 seed"
    assert math.isnan(difference.interval.low) and math.isnan(difference.interval.high)
    assert "run more seeds" in difference.explain()
    assert t_interval([3.0]).format() == "3.00 (1 seed: no interval)"


def test_a_constant_nonzero_difference_is_resolved() -> None:
    assert paired_difference([b + 0.28 for b in BASE], BASE).verdict == "better"


def test_a_small_noisy_difference_says_how_many_seeds_it_would_need() -> None:
    variant = [98.0, 97.9, 98.9, 97.1, 98.5]
    difference = paired_difference(variant, BASE)
    differences = np.subtract(variant, BASE)
    assert difference.verdict == "not resolved at 5 seeds"
    n, mean, sd = difference.seeds_needed, differences.mean(), differences.std(ddof=1)
    assert n is not None and n > 5

    def half_width(seeds: int) -> float:
        return stats.t.ppf(0.975, seeds - 1) * sd / math.sqrt(seeds)

    assert half_width(n) < abs(mean) <= half_width(n - 1)  # the smallest such n
    assert f"would need {n} seeds" in difference.explain()


def test_interval_matches_scipy() -> None:
    interval = t_interval(BASE)
    low, high = stats.t.interval(0.95, len(BASE) - 1, loc=np.mean(BASE), scale=stats.sem(BASE))
    assert interval.low == pytest.approx(low) and interval.high == pytest.approx(high)


@pytest.mark.parametrize("seeds", [3, 5])
def test_the_95_percent_interval_covers_at_its_nominal_rate(seeds: int) -> None:
    rng = np.random.default_rng(seeds)
    true_mean, draws = 0.4, 2000
    covered = 0
    for _ in range(draws):
        interval = t_interval(list(rng.normal(true_mean, 0.7, seeds)))
        covered += interval.low <= true_mean <= interval.high
    assert 0.93 <= covered / draws <= 0.97


def test_step_ratio_and_epochs_to_target() -> None:
    assert median_ratio([2.0, 2.2, 9.0], [1.0, 1.0, 1.0]) == pytest.approx(2.2)  # one burst ignored
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])
    history = [{"epoch": 1, "val_acc": 80.0}, {"epoch": 2, "val_acc": 96.0}, {"epoch": 3, "val_acc": 94.0}]
    assert epochs_to(history, 95.0) == 2
    assert epochs_to(history, 99.0) is None
    assert seeds_needed(0.0, 1.0) is None


def test_holm_steps_down_and_counts_seeds_at_the_family_level() -> None:
    rng = np.random.default_rng(1)
    strong = [b + 2.0 + e for b, e in zip(BASE, rng.normal(0, 0.1, 5))]  # p far below 0.05 / 3
    weak = [98.0, 97.9, 98.9, 97.1, 98.5]  # p about 0.34
    marginal = [b + d for b, d in zip(BASE, [0.1, 0.5, 0.05, 0.6, 0.3])]  # p about 0.045
    alone = paired_difference(marginal, BASE)
    tests = {"strong": paired_difference(strong, BASE), "weak": paired_difference(weak, BASE), "marginal": alone}
    p = {k: d.p_value for k, d in tests.items()}
    assert p["strong"] < 0.05 / 3 and 0.05 / 2 < p["marginal"] < 0.05 and p["weak"] > 0.05  # the case we mean
    assert alone.verdict == "better"  # alone, its 95% interval excludes 0 ...
    decided = holm(tests)
    assert decided["strong"].verdict == "better"
    assert decided["marginal"].verdict == "not resolved at 5 seeds"  # ... in a family of 3 it needs p <= 0.05 / 2
    assert decided["marginal"].interval == alone.interval  # the interval stays per comparison
    # its seeds are counted at level 0.05 / 3: the smallest n whose (1 - 0.05/3) interval would exclude 0
    n, sd, mean = decided["marginal"].seeds_needed, decided["marginal"].sd, decided["marginal"].interval.mean
    assert stats.t.ppf(1 - 0.05 / 6, n - 1) * sd / math.sqrt(n) < abs(mean) <= \
        stats.t.ppf(1 - 0.05 / 6, n - 2) * sd / math.sqrt(n - 1)
    assert p["strong"] == pytest.approx(stats.ttest_rel(strong, BASE).pvalue)
    assert holm({"one": alone})["one"] == alone  # a family of one is the single test


def _null_comparison(rng: np.random.Generator, variants: int, seeds: int) -> Comparison:
    """Final accuracy, NLL, ECE, Brier and their MC-dropout versions per seed, every variant drawn like the
    baseline: a per-seed effect that every variant shares (pairing) plus noise of its own."""
    keys = ["nll", "ece", "brier", "mc_top1", "mc_nll", "mc_ece", "mc_brier", "mc_entropy", "mc_mutual_information"]
    names = ["baseline", *(f"ic:p=0.{k + 1}" for k in range(variants))]
    seed_effect = rng.normal(0, 1, (seeds, len(keys) + 1))
    histories, evaluations = {}, {}
    for name in names:
        values = 50 + seed_effect + rng.normal(0, 0.5, seed_effect.shape)
        histories[name] = [[{"epoch": 1, "val_acc": float(v[0]), "val_loss": 1.0}] for v in values]
        evaluations[name] = [dict(zip(keys, map(float, v[1:]))) for v in values]
    return Comparison(Path("unused"), names, histories, {n: [[1.0]] * seeds for n in names}, 95.0, {},
                      evaluations, mc_samples=2)


@pytest.mark.parametrize("draws", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_comparisons_where_no_variant_differs_call_a_difference_at_most_5_percent_of_the_time(draws: int) -> None:
    """3 IC variants x 8 tested metrics = 24 paired tests per comparison, at 3 seeds, ``draws`` comparisons under
    the null. Holm's procedure bounds the share with any better/worse verdict by 5%; the bound on the observed
    share adds 3 binomial standard deviations of ``draws`` at 5% (2.1 points for 1,000, 0.65 for 10,000).
    Without the family control (each test at 95% alone) the share is far above it (about 2/3), so the
    simulation can tell the two apart."""
    rng = np.random.default_rng(20261207)
    any_called = any_called_alone = 0
    for _ in range(draws):
        comparison = _null_comparison(rng, variants=3, seeds=3)
        assert comparison.family_size == 24
        tests = [d for s in comparison.summaries().values() for d in s.against_baseline.values()]
        any_called += any(not d.verdict.startswith("not resolved") for d in tests)
        any_called_alone += any(d.p_value <= 0.05 for d in tests)
    assert any_called / draws <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / draws)
    assert any_called_alone / draws > 0.3


# -- variant specs ------------------------------------------------------------------------------

def test_variant_specs_parse_into_conversion_options() -> None:
    assert parse_variant("baseline").options is None
    assert parse_variant("ic").options == {"init": "fresh"}
    variant = parse_variant("ic:p=0.1,layout=ic-conv-relu,stem=true,exclude=head.fc|stem*")
    assert variant.options == {"init": "fresh", "p": 0.1, "layout": "ic-conv-relu", "stem": True,
                               "exclude": ("head.fc", "stem*")}
    assert variant.key == "ic:p=0.1,stem=true,exclude=head.fc|stem*,layout=ic-conv-relu"  # Options' order
    assert variant.folder.startswith("ic-p0.1-stemtrue-excludehead.fc-stem-layoutic-conv-relu-")  # + a hash: '|*'
    assert parse_variant("ic:p=0.1,layout=ic-conv-relu").folder == "ic-p0.1-layoutic-conv-relu"
    parsed = parse_variants("ic:p=0.1,layout=ic-conv-relu,baseline,ic,ic:init=preserve")
    assert [v.spec for v in parsed] == ["baseline", "ic:p=0.1,layout=ic-conv-relu", "ic", "ic:init=preserve"]


@pytest.mark.parametrize("specs, message", [
    ("baseline,ic:q=1", "'q=1' is not KEY=VALUE with KEY one of p, init"),
    ("baseline,ic:p=lots", "p takes a float, got 'lots'"),
    ("baseline,ic:p=1.5", "variant 'ic:p=1.5': "),
    ("baseline,ic:layout=ic-conv-relu,init=preserve", "use it with init='fresh'"),
    ("baseline,ic:stem=maybe", "stem takes true or false"),
    ("baseline,dropout", "bad variant 'dropout'"),
    ("baseline,ic:", "bad variant 'ic:'"),
    ("ic,ic:p=0.1", "must include baseline"),
    ("baseline,ic,ic", "variants given twice: ic"),
    ("baseline,ic:p=0.1,ic:p=0.10", "variants given twice: ic:p=0.10 (the same options as 'ic:p=0.1')"),
    ("baseline,ic,ic:init=fresh", "variants given twice: ic:init=fresh (the same options as 'ic')"),
    ("baseline,ic:p=0.1,stem=true,ic:stem=yes,p=1e-1", "the same options as 'ic:p=0.1,stem=true'"),
    ("baseline,ic:p=0.1,p=0.2", "variant 'ic:p=0.1,p=0.2': p is given twice; give each option once"),
])
def test_bad_variant_specs_are_one_line_errors(specs: str, message: str) -> None:
    with pytest.raises(ComparisonError, match=None) as raised:
        parse_variants(specs)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_variants_differing_only_where_a_file_name_cannot_show_it_are_kept_apart() -> None:
    parsed = parse_variants("baseline,ic:exclude=a|b,ic:exclude=a-b")
    assert [v.options["exclude"] for v in parsed[1:]] == [("a", "b"), ("a-b",)]
    assert len({v.folder for v in parsed}) == 3


_SPELLINGS = {True: ["true", "True", "1", "yes"], False: ["false", "FALSE", "0", "no"]}


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 0.99, allow_nan=False), st.booleans(), st.booleans(), st.randoms(use_true_random=False),
       st.lists(st.sampled_from(["fc", "layer4.*", "head", "stem*", "a-b"]), max_size=3, unique=True))
def test_a_variant_is_its_options_however_spelled(p: float, stem: bool, head: bool, rng: Any,
                                                   exclude: list[str]) -> None:
    items = [f"p={rng.choice([repr(p), f'{p:.17g}', f'{p:.17e}'])}", f"stem={rng.choice(_SPELLINGS[stem])}",
             f"head={rng.choice(_SPELLINGS[head])}", f"exclude={'|'.join(exclude)}"]
    rng.shuffle(items)
    one, other = parse_variant("ic:" + ",".join(items)), parse_variant(f"ic:p={p!r},stem={stem},head={head},"
                                                                         f"exclude={'|'.join(exclude)}")
    assert one.key == other.key and one.folder == other.folder and one.options == other.options
    assert parse_variant(one.key).key == one.key  # the key is a spec of the same variant
    changed = parse_variant(f"ic:p={p!r},stem={not stem},head={head},exclude={'|'.join(exclude)}")
    assert changed.key != one.key and changed.folder != one.folder


def test_the_spec_parser_takes_a_new_options_field_by_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added to ``icrewrite.Options`` (here a per-layer p mapping) is read from its annotation."""

    @dataclasses.dataclass(frozen=True)
    class WithOverrides(icrewrite.Options):
        p_overrides: Mapping[str, float] = dataclasses.field(default_factory=dict)

    monkeypatch.setattr(compare_module, "Options", WithOverrides)
    variant = parse_variant("ic:p_overrides=layer4.*=0.1|fc=0")
    assert variant.options["p_overrides"] == {"layer4.*": 0.1, "fc": 0.0}
    assert variant.key == "ic:p_overrides=layer4.*=0.1|fc=0.0"
    assert parse_variant("ic:p-overrides=layer4.*=0.10|fc=0.0").key == variant.key
    assert parse_variant("ic:p_overrides=fc=0|layer4.*=0.1").key != variant.key  # first match wins: order counts
    with pytest.raises(ComparisonError, match="p_overrides takes a float, got 'x'"):
        parse_variant("ic:p_overrides=fc=x")
    with pytest.raises(ComparisonError, match="p_overrides takes PATTERN=VALUE items"):
        parse_variant("ic:p_overrides=fc")


# -- runs ---------------------------------------------------------------------------------------

def _loaders() -> tuple[DataLoader, DataLoader]:
    return (DataLoader(Subset(DigitsDataset("train", 16), range(192)), batch_size=64, shuffle=True, drop_last=True),
            DataLoader(Subset(DigitsDataset("test", 16), range(96)), batch_size=96))


def _build() -> torch.nn.Module:
    return create_timm_model("resnet18", **TINY)


def _fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def test_runs_are_paired_same_initial_weights_and_batches_per_seed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What every run starts from and trains on, recorded inside the real ``finetune`` runs."""
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    real_finetune = compare_module.finetune

    def recording_finetune(model: torch.nn.Module, train: DataLoader, val: DataLoader, out_dir: Path,
                           **options: Any) -> Any:
        record = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "batches": []}
        seen[(options["seed"], Path(out_dir).name)] = record

        def log_batch(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
            if module.training:
                record["batches"].append(_fingerprint(inputs[0]))

        model.register_forward_pre_hook(log_batch)
        return real_finetune(model, train, val, out_dir, **options)

    monkeypatch.setattr(compare_module, "finetune", recording_finetune)
    compare(_build, *_loaders(), tmp_path, variants="baseline,ic:p=0.1", seeds=2, timing_rounds=1, epochs=2,
            log=lambda _: None, progress=False)

    for seed in range(2):
        base, ic = seen[(seed, "baseline")], seen[(seed, "ic-p0.1")]
        shared = base["weights"].keys() & ic["weights"].keys()
        assert sum(name.endswith("conv1.weight") for name in shared) >= 8  # every conv keeps its name
        # Equal up to the BatchNorm after each conv1, folded into it: a fresh one scales by 1/sqrt(1 + eps).
        assert all(torch.allclose(base["weights"][k].float(), ic["weights"][k].float(), rtol=1e-5) for k in shared)
        assert len(base["batches"]) == 2 * 3 and base["batches"] == ic["batches"]
    # ... and the seeds differ from each other in both.
    assert not torch.allclose(seen[(0, "baseline")]["weights"]["conv1.weight"],
                              seen[(1, "baseline")]["weights"]["conv1.weight"], rtol=0.1)
    assert seen[(0, "baseline")]["batches"] != seen[(1, "baseline")]["batches"]


class Interrupted(Exception):
    pass


def _records(path: Path) -> dict[str, Any]:
    """The per-epoch records of ``compare.json`` without the wall times, which differ run to run."""
    runs = json.loads((path / "compare.json").read_text())["runs"]
    return {v: [[{k: x for k, x in r.items() if k != "epoch_time_s"} for r in h] for h in hs]
            for v, hs in runs.items()}


def test_an_interrupted_comparison_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = dict(variants="baseline,ic", seeds=2, timing_rounds=1, epochs=2, checkpoint_interval=2,
                   log=lambda _: None, progress=False)
    compare(_build, *_loaders(), tmp_path / "whole", **options)

    real_finetune, calls = compare_module.finetune, []

    def finetune_killed_in_third_run(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:  # seed 1's baseline: killed in its second epoch, after a mid-epoch checkpoint
            steps = []

            def kill(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
                steps.append(module.training)
                if sum(steps) == 5:
                    raise Interrupted

            model.register_forward_pre_hook(kill)
        return real_finetune(model, *args, **kwargs)

    monkeypatch.setattr(compare_module, "finetune", finetune_killed_in_third_run)
    with pytest.raises(Interrupted):
        compare(_build, *_loaders(), tmp_path / "resumed", **options)
    assert not (tmp_path / "resumed" / "compare.json").exists()
    with pytest.raises(ComparisonError, match="not empty"):
        compare(_build, *_loaders(), tmp_path / "resumed", **options)
    monkeypatch.setattr(compare_module, "finetune", real_finetune)
    resumed = compare(_build, *_loaders(), tmp_path / "resumed", resume=True, **options)

    assert _records(tmp_path / "resumed") == _records(tmp_path / "whole")
    assert (tmp_path / "resumed" / "report.md").read_text().count("| ic |") == 2
    assert resumed.verdicts()["ic"].startswith("ic against baseline, final test accuracy (points): ")


def test_one_progress_bar_for_a_comparison_and_epoch_lines_only_when_verbose(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = dict(variants="baseline,ic", seeds=1, timing_rounds=1, epochs=2, log=print)
    compare(_build, *_loaders(), tmp_path / "quiet", **options)
    quiet = capsys.readouterr()
    assert "4/4 epochs" in quiet.err and "seed 1/1 ic" in quiet.err  # runs done, the current run
    assert "train loss" not in quiet.out + quiet.err and "training" not in quiet.out + quiet.err
    compare(_build, *_loaders(), tmp_path / "verbose", verbose=True, **options)
    verbose = capsys.readouterr()
    assert (verbose.out + verbose.err).count("train loss") == 4  # 2 runs x 2 epochs
    assert "seed 1/1: training ic" in verbose.out
    compare(_build, *_loaders(), tmp_path / "none", progress=False, **options)
    assert "epochs" not in capsys.readouterr().err


# -- command line -------------------------------------------------------------------------------

def test_cli_compare_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from icrewrite.cli import main

    data = write_digits_folder(tmp_path / "images", per_class=12, classes=3)
    model = tmp_path / "tiny.safetensors"
    icrewrite.save(create_timm_model("resnet18", **{**TINY, "num_classes": 3}), model)
    out = tmp_path / "cmp"
    command = ["compare", str(model), "--data", str(data), "--img-size", "16", "--batch-size", "8", "--epochs", "1",
               "--workers", "0", "--seeds", "2", "--timing-rounds", "2", "--variants", "baseline,ic:p=0.1", "--no-progress",
               "--mc-samples", "2", "-o", str(out)]
    assert main(command) == 0
    stdout = capsys.readouterr().out
    assert "ic:p=0.1 against baseline, final test accuracy (points): " in stdout
    summary = json.loads((out / "compare.json").read_text())
    assert summary["variants"] == ["baseline", "ic:p=0.1"]
    assert [len(h) for h in summary["runs"]["ic:p=0.1"]] == [1, 1]
    assert summary["summary"]["ic:p=0.1"]["step_ratio"]["n"] == 2
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "| ic:p=0.1 |" in report and "| variant | MC acc (%) | MC NLL |" in report
    assert "Holm's step-down over the 8 paired tests (1 variant(s) x 8 metrics)" in report
    evaluation = summary["evaluations"]["ic:p=0.1"][1]
    assert {"nll", "ece", "brier", "mc_nll", "mc_ece", "mc_brier", "mc_mutual_information"} <= set(evaluation)
    assert evaluation["mc_mutual_information"] > 0
    assert summary["evaluations"]["baseline"][0]["mc_mutual_information"] == 0
    for seed in range(2):
        assert (out / f"seed-{seed}" / "ic-p0.1" / "last.safetensors").is_file()

    assert main(command) == 2  # the folder holds a comparison: refused
    assert "is not empty; resume the comparison" in capsys.readouterr().err
    assert main([*command, "--resume"]) == 0  # every run finished: read back
    other = [("baseline,ic:p=0.2" if arg == "baseline,ic:p=0.1" else arg) for arg in command]
    assert main([*other, "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot resume {out} with other variants: it was started with baseline,ic:p=0.1, this asks for "
        "baseline,ic:p=0.2; give the same variants or a new output folder")
    respelled = [("ic:p=0.10,baseline" if arg == "baseline,ic:p=0.1" else arg) for arg in command]
    assert main([*respelled, "--resume"]) == 0  # the same variants, spelled otherwise
    assert main([*command[:-2], "--variants", "baseline,ic:p=2", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: variant 'ic:p=2': ")


def test_cli_compare_writes_its_report_under_a_c_locale_with_a_non_ascii_path(tmp_path: Path) -> None:
    """Without a UTF-8 locale the report is still written, as UTF-8, with the path's own bytes."""
    data = write_digits_folder(tmp_path / "données", per_class=8, classes=2)
    model = tmp_path / "tiny.safetensors"
    icrewrite.save(create_timm_model("resnet18", **{**TINY, "num_classes": 2}), model)
    out = tmp_path / "résultats"
    env = {**subprocess_env(), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": ""}
    command = [sys.executable, "-m", "icrewrite.cli", "compare", str(model), "--data", str(data), "--img-size", "16",
               "--batch-size", "4", "--epochs", "1", "--workers", "0", "--seeds", "2", "--timing-rounds", "1",
               "--variants", "baseline,ic", "--no-progress", "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert str(data).encode() in (out / "report.md").read_bytes()
    assert json.loads((out / "compare.json").read_text(encoding="utf-8"))["variants"] == ["baseline", "ic"]


@pytest.mark.slow
def test_cli_compare_under_torchrun_two_gloo_ranks(tmp_path: Path) -> None:
    """Every run of the comparison trains on both ranks in one process group; rank 0 alone reports."""
    model = tmp_path / "tiny.safetensors"
    icrewrite.save(_build(), model)
    out = tmp_path / "cmp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "icrewrite.cli", "compare", str(model), "--data", "digits", "--img-size", "16", "--epochs", "1",
               "--seeds", "2", "--timing-rounds", "2", "--variants", "baseline,ic:p=0.1", "--no-progress",
               "-o", str(out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ic:p=0.1 against baseline") == 1
    summary = json.loads((out / "compare.json").read_text())
    assert [len(h) for h in summary["runs"]["baseline"]] == [1, 1]
    assert json.loads((out / "seed-0" / "baseline" / "metrics.jsonl").read_text())["epoch"] == 1
