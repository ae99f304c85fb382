"""The zoo sweep: one model per timm family that needed special handling, and the sweep machinery."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from icrewrite import convert, plan
from icrewrite.rewrite import Options, make_plan
from icrewrite.testing import check_conversion
from zoo import (Entry, _input_sizes, build_on_meta, interleave_families, main, meta_check, read_results,
                           real_check, run_isolated, small_inputs, write_report)


def timm_entry(name: str) -> Entry:
    return Entry("timm", name, timm.models.model_entrypoint(name).__module__)


# Each needed something the plain FX trace of the model does not give.
SPECIAL = {
    "gemma4_vit_167m_enc": "the model's own forward is untraceable: children one by one, stem by position",
    "convit_tiny": "GPSA attention is an untraceable leaf: traced as scopes, layers inside probed on meta",
    "mobilevit_xxs": "MobileVitBlock is a timm leaf that hides weight layers",
    "nf_resnet26": "NormFreeBlock hides ScaledStdConv2d layers; no BatchNorm at all",
    "hiera_tiny_224": "forward(x, mask=None): the head only runs when mask is None",
    "crossvit_tiny_240": "two stems, each reading a resized copy of the input",
    "efficientvit_m0": "cascaded group attention with shape-dependent control flow",
}


# Families newer than the oldest timm icrewrite supports (1.0.9): name -> first timm version with it.
SINCE = {"gemma4_vit_167m_enc": "1.0.27"}


def in_this_timm(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not timm.is_model(name), reason=f"{name} is in timm >= {SINCE.get(name, '?')}, "
                                                             f"not in {timm.__version__}")


@pytest.mark.parametrize("name", [pytest.param(name, marks=in_this_timm(name)) for name in sorted(SPECIAL)])
def test_special_family_plans_and_converts_on_meta(name):
    record = meta_check(timm_entry(name))
    assert record["status"] == "ok", record["gaps"]
    assert record["ic"] + record["stem"] == record["weight_layers"]
    assert not record["unseen"]


def test_stems_found_through_weight_free_input_ops():
    assert meta_check(timm_entry("crossvit_tiny_240"))["stem"] == 2  # resized input, one stem per branch


@in_this_timm("gemma4_vit_167m_enc")
def test_stem_found_by_position_in_an_untraceable_root():
    assert meta_check(timm_entry("gemma4_vit_167m_enc"))["stem"] == 1  # untraceable root, patchified input


def test_meta_check_converts_by_the_plan_read_back_from_json(monkeypatch):
    """The plan goes through JSON, and convert gets the plan read back, not the one planned."""
    given = []
    monkeypatch.setattr(zoo, "convert", lambda model, plan: given.append(plan) or convert(model, plan=plan))
    monkeypatch.setattr(zoo, "make_plan", lambda *args: given.append(planned := make_plan(*args)) or planned)
    record = meta_check(timm_entry("eva02_tiny_patch14_224"))  # a reroute, folds none, meta
    planned, replayed = given
    assert record["status"] == "ok" and replayed == planned and replayed is not planned
    assert replayed.count("route-through-module") == 12


def test_a_plan_that_changes_through_json_is_an_error(monkeypatch):
    monkeypatch.setattr(zoo.Plan, "from_dict", classmethod(lambda cls, data: cls("other", Options(), 0)))
    with pytest.raises(ValueError, match="plan read back from JSON differs"):
        zoo.through_json(plan(timm.create_model("resnet10t")))


class FunctionalHead(nn.Module):
    """Passes ``fc.weight`` to ``F.linear`` instead of calling ``fc``, as attention blocks that
    icrewrite does not reroute do."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mid(self.stem(x)).mean((2, 3)), self.fc.weight, self.fc.bias)


def test_weight_used_functionally_is_a_reported_gap(monkeypatch):
    """An IC block on ``fc`` would never run, so none is inserted and the sweep says so."""
    monkeypatch.setattr(zoo, "build", lambda entry, **kwargs: FunctionalHead())
    record = meta_check(Entry("timm", "functional_head", "tests"))
    assert record["status"] == "gap" and list(record["gaps"]) == ["fc"], record["gaps"]
    assert "used functionally" in record["gaps"]["fc"] and record["ic"] == 1


@pytest.mark.parametrize("name,kwargs", [("convit_tiny", {"img_size": 32}), ("mobilevit_xxs", {}),
                                         ("nf_resnet26", {})])
def test_special_family_real_check(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    result = check_conversion(model, torch.randn(4, 3, 32, 32))
    assert result.ok, result.failures


def test_real_check_skips_models_over_the_budget_and_picks_a_small_input():
    """botnet26t_256 has a fixed input size and a min_input_size of 224, yet built for 32x32 it runs there."""
    assert real_check(timm_entry("resnet50"), max_params=1e6)["status"] == "skipped"
    record = real_check(timm_entry("botnet26t_256"), max_params=15e6, img_size=32)
    assert record["status"] == "ok" and record["input_size"] == [3, 32, 32], record["failures"]


def test_drop_path_rates_read_with_item_keep_the_model_on_meta(monkeypatch):
    """timm up to 1.0.2x: ``[x.item() for x in torch.linspace(0, drop_path_rate, depth)]`` in the builder."""
    def reads_rates(entry, **kwargs):
        rates = [x.item() for x in torch.linspace(0, 0.1, 3)]
        return nn.Sequential(*(nn.Dropout(rate) for rate in rates), nn.Linear(8, 8))

    monkeypatch.setattr(zoo, "build", reads_rates)
    model, device = build_on_meta(Entry("timm", "rates", "fake"))
    assert device == "meta" and model[-1].weight.is_meta and model[1].p == pytest.approx(0.05)


@pytest.mark.parametrize("error", [RuntimeError("Tensor.item() cannot be called on meta tensors"),
                                   TypeError("expected TensorOptions(device=cpu) (got TensorOptions(device=meta))")])
def test_a_cpu_build_over_the_budget_is_stopped_and_recorded_as_skipped(monkeypatch, error):
    """Builders that need real tensors are built on the CPU; a big one is stopped as its parameters are made."""
    def needs_real_tensors(entry, **kwargs):
        if torch.empty(0).is_meta:
            raise error
        return nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100), nn.Linear(100, 100))

    monkeypatch.setattr(zoo, "build", needs_real_tensors)
    entry = Entry("timm", "big", "fake")
    assert build_on_meta(entry, cpu_max_params=1e6)[1] == "cpu"
    record = zoo._run_one(lambda entry: build_on_meta(entry, cpu_max_params=15_000), entry, {})
    assert record["status"] == "skipped" and "over the CPU budget" in record["reason"]


def test_input_size_is_doubled_until_the_model_runs():
    assert _input_sizes({"input_size": (3, 299, 299)}, 32) == [(3, 32, 32), (3, 64, 64), (3, 128, 128),
                                                              (3, 256, 256), (3, 299, 299)]
    entry = timm_entry("inception_v3")  # unpadded 3x3 convs: at 32x32 they meet a 1x1 map, at 64x64 a 2x2 one
    sizes = small_inputs(entry, build_on_meta(entry)[0].pretrained_cfg, 32)
    assert next(sizes)[1] == (3, 128, 128)


# --- the sweep machinery -------------------------------------------------------------------------

def fake_check(entry: Entry) -> dict:
    """Stands in for a model check: ``hang`` never returns, ``die`` kills its worker."""
    if entry.name == "hang":
        time.sleep(600)
    if entry.name == "die":
        os._exit(3)
    if entry.name == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if entry.name == "raise":
        raise ValueError("broken model")
    return {"status": "ok", "pid": os.getpid()}


def test_hanging_and_crashing_models_are_recorded_and_the_sweep_goes_on():
    entries = [Entry("timm", name, "fake") for name in ("a", "hang", "die", "killed", "raise", "b")]
    records = {r["name"]: r for r in run_isolated(fake_check, entries, workers=2, timeout=5)}
    assert {name: r["status"] for name, r in records.items()} == {
        "a": "ok", "hang": "timeout", "die": "crash", "killed": "crash", "raise": "error", "b": "ok"}
    assert "exit code 3" in records["die"]["reason"] and "broken model" in records["raise"]["reason"]
    assert "killed by SIGKILL" in records["killed"]["reason"]
    assert records["a"]["pid"] != os.getpid()


def test_sweep_resumes_and_writes_the_report(tmp_path):
    results, report = tmp_path / "zoo.jsonl", tmp_path / "coverage.md"
    args = ["--timm", "--filter", "resnet18*", "resnet18", "--workers", "1", "--results", str(results),
            "--report", str(report)]
    assert main(args) == 0
    first = results.read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in first) == ["resnet18", "resnet18d"]  # each model once
    assert main(args) == 0
    assert results.read_text().splitlines() == first  # nothing run twice
    text = report.read_text()
    assert "timm: **2 / 2** models pass" in text and "`timm.models.resnet`" in text
    assert f"timm {timm.__version__}" in text and f"torch {torch.__version__}" in text


def test_report_lists_every_failure_with_its_reason(tmp_path):
    records = [
        {"mode": "meta", "source": "timm", "name": "good", "family": "timm.models.a", "status": "ok", "seconds": 1.0},
        {"mode": "meta", "source": "timm", "name": "slow", "family": "timm.models.a", "status": "timeout",
         "reason": "no result within 60 s", "seconds": 60.0},
        {"mode": "meta", "source": "timm", "name": "holey", "family": "timm.models.b", "status": "gap",
         "gaps": {"blocks.0.attn.qkv": "its weight is used functionally"}, "seconds": 1.0},
        {"mode": "real", "source": "timm", "name": "good", "family": "timm.models.a", "status": "fail",
         "reason": "head: input not normalised", "input_size": [3, 32, 32], "seconds": 3.0},
    ]
    write_report(records, tmp_path / "coverage.md", run_info="test run")
    text = (tmp_path / "coverage.md").read_text()
    assert "timm: **1 / 3** models pass" in text
    assert "`slow` (timm, timeout): no result within 60 s" in text
    assert "blocks.0.attn.qkv" in text and "its weight is used functionally" in text
    assert "head: input not normalised" in text and "| `timm.models.b` | 1 | 0 | 1 |" in text


def test_results_file_keeps_the_latest_record_per_model(tmp_path):
    path = tmp_path / "zoo.jsonl"
    lines = [{"mode": "meta", "source": "timm", "name": "m", "status": "timeout"},
             {"mode": "meta", "source": "timm", "name": "m", "status": "ok"},
             {"mode": "real", "source": "timm", "name": "m", "status": "fail"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_results(path)
    assert records["meta", "timm", "m"]["status"] == "ok" and records["real", "timm", "m"]["status"] == "fail"


def test_families_are_interleaved_for_partial_real_sweeps():
    entries = [Entry("timm", n, f) for n, f in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C")]]
    assert [e.name for e in interleave_families(entries)] == ["a1", "b1", "c1", "a2", "a3"]
