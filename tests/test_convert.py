"""Plan and convert (icrewrite.rewrite._plan, _apply) on hand-built patterns, generated nets and timm models:
the edits, the options, converting by a given plan, idempotence, calibration and fresh init, pickling, and the
convert-speed benchmark."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import icrewrite
from icrewrite.layers import IC, ICWeightLayer, attach_ic
from icrewrite.testing import check_conversion, randomize_norms

from generated import networks
from nets import PATTERNS, timm_model

TIMM_MODELS = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "densenet121", "regnetx_002",
               "convnext_atto", "vit_tiny_patch16_224"]


# --- hand-built patterns ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_converts_correctly(name):
    result = check_conversion(PATTERNS[name](), torch.randn(8, 3, 16, 16))
    assert result.ok, result.failures


def _actions(plan) -> dict[str, str]:
    return {e.target: e.action for e in plan.edits}


def test_residual_block_becomes_relu_ic_conv():
    plan = icrewrite.plan(PATTERNS["residual"]())
    assert _actions(plan) == {"stem.1": "fold-norm", "bn1": "fold-norm", "conv1": "insert-ic",
                              "conv2": "insert-ic", "fc": "insert-ic"}
    converted = icrewrite.convert(PATTERNS["residual"]())
    assert isinstance(converted.bn1, nn.Identity) and isinstance(converted.bn2, nn.BatchNorm2d)
    assert isinstance(converted.conv2, ICWeightLayer) and converted.conv1.bias is not None


def test_batchnorm_with_a_second_consumer_is_kept_and_said_so():
    plan = icrewrite.plan(PATTERNS["fused_norm_act"]())
    assert _actions(plan)["bn_act"] == "replace-norm-act"
    kept = {n.target: n.reason for n in plan.notes}
    assert "other consumers" in kept["bn_shared"]
    converted = icrewrite.convert(PATTERNS["fused_norm_act"]())
    assert isinstance(converted.bn_act, nn.SiLU) and isinstance(converted.bn_shared, nn.BatchNorm2d)


def test_preactivation_norms_on_a_concat_are_kept():
    kept = {n.target: n.reason for n in icrewrite.plan(PATTERNS["dense"]()).notes}
    assert "output of stem has other consumers" in kept["norm1"]  # stem also feeds the concat
    assert "not produced by a weight layer" in kept["norm2"]  # its input is the concat


def test_linear_on_tokens_gets_last_dim_ic_and_two_consumers_get_one_each():
    converted = icrewrite.convert(PATTERNS["tokens"]())
    assert converted.q.ic.feature_dim == -1 and converted.q.ic is not converted.k.ic
    assert isinstance(converted.bn, nn.Identity)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_generated_networks_convert_correctly(net):
    result = check_conversion(net, torch.randn(8, 3, 8, 8))
    assert result.ok, result.failures


# --- timm models -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_converts_correctly(name):
    result = check_conversion(timm_model(name), torch.randn(4, 3, 32, 32))
    assert result.ok, result.failures
    assert result.sites > 10


def test_timm_methods_and_names_keep_working():
    model = randomize_norms(timm_model("resnet18", num_classes=7)).eval()
    converted = icrewrite.convert(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.forward_head(converted.forward_features(x)), model(x), atol=1e-4, rtol=1e-4)
    keys = converted.state_dict().keys()
    cfg = converted.pretrained_cfg
    assert f"{cfg['first_conv']}.weight" in keys and f"{cfg['classifier']}.weight" in keys
    assert "layer1.0.conv1.weight" in keys and "layer1.0.conv1.ic.norm.running_mean" in keys
    converted.reset_classifier(3)
    assert converted(x).shape == (2, 3)


def test_features_only_model_converts():
    model = randomize_norms(timm_model("resnet18", features_only=True, out_indices=(2, 4))).eval()
    result = icrewrite.verify(model, icrewrite.convert(model), torch.randn(2, 3, 32, 32))
    assert result.ok and result.param_delta > 0


def test_plan_and_convert_on_meta_device():
    with torch.device("meta"):
        model = timm_model("resnet50")
    plan = icrewrite.plan(model)
    converted = icrewrite.convert(model)
    assert plan.count("insert-ic") == 53 and plan.count("fold-norm") + plan.count("replace-norm-act") == 33
    assert all(p.is_meta for p in converted.parameters())
    assert sum(p.numel() for p in converted.parameters()) == plan.params_after


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    model = randomize_norms(PATTERNS["chain"]()).to(dtype).eval()
    converted = icrewrite.convert(model)
    assert {p.dtype for p in converted.parameters()} == {dtype}
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 0.05
    assert icrewrite.verify(model, converted, x).max_rel_error < tolerance


# --- options -----------------------------------------------------------------------------------

def test_stem_head_and_exclude_options():
    model = timm_model("resnet18")
    sites = lambda **kw: {e.target for e in icrewrite.plan(model, **kw).edits if e.action == "insert-ic"}
    default = sites()
    assert "conv1" not in default and "fc" in default
    assert sites(stem=True) == default | {"conv1"}
    assert sites(head=False) == default - {"fc"}
    assert sites(exclude=["layer4*"]) == {s for s in default if not s.startswith("layer4")}


def test_convert_is_a_copy_unless_inplace():
    model = PATTERNS["chain"]()
    assert icrewrite.convert(model) is not model and not isinstance(model.fc, ICWeightLayer)
    assert icrewrite.convert(model, inplace=True) is model and isinstance(model.fc, ICWeightLayer)


def test_convert_by_a_given_plan_does_not_plan_again(monkeypatch):
    model = randomize_norms(timm_model("resnet18")).eval()
    the_plan = icrewrite.plan(model, p=0.1, exclude="layer4*")
    expected = icrewrite.convert(model, p=0.1, exclude="layer4*")

    def plan_again(*args, **kwargs):
        raise AssertionError("convert traced the model again")

    monkeypatch.setattr(sys.modules["icrewrite.rewrite._apply"], "make_plan", plan_again)  # the module, not the function
    converted = icrewrite.convert(model, plan=the_plan)
    assert converted.icrewrite_options == expected.icrewrite_options and converted.icrewrite_options["p"] == 0.1
    assert converted.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), expected.state_dict().values()))
    assert not isinstance(converted.layer4[0].conv1, ICWeightLayer)
    with pytest.raises(icrewrite.ConversionError, match="give the options to plan"):
        icrewrite.convert(model, p=0.2, plan=the_plan)
    with pytest.raises(icrewrite.ConversionError, match="plan was made for resnet18 .* parameters, not this model"):
        icrewrite.convert(timm_model("resnet34"), plan=the_plan)


def test_converting_twice_changes_nothing_and_partial_is_an_error():
    model = randomize_norms(timm_model("resnet18")).eval()
    once = icrewrite.convert(model)
    twice = icrewrite.convert(once)
    assert twice.state_dict().keys() == once.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(once.state_dict().values(), twice.state_dict().values()))
    assert icrewrite.plan(once).present and not icrewrite.plan(once).edits
    partial = copy.deepcopy(model)
    attach_ic(partial.layer1[0].conv1, IC(64))  # IC blocks that icrewrite did not put there
    with pytest.raises(icrewrite.ConversionError, match="partially converted"):
        icrewrite.convert(partial)


@pytest.mark.parametrize("options,match", [
    (dict(p=1.5), "p must be"), (dict(p=float("nan")), "p must be"), (dict(p="0.1"), "p must be a number"),
    (dict(p=True), "p must be a number"), (dict(init="zeros"), "init must"), (dict(layout="conv-ic"), "layout must"),
    (dict(layout="ic-conv-relu"), "changes the function"), (dict(exclude=None), "exclude takes"),
    (dict(exclude=[1]), "exclude takes"), (dict(stem="yes"), "stem must be True or False"),
    (dict(p_overrides={"fc": 1.5}), r"p_overrides\['fc'\] must be in \[0, 1\)"),
    (dict(p_overrides={"fc": "0.1"}), "must be a number"), (dict(p_overrides="fc"), "PATTERN=P"),
    (dict(p_overrides="fc=x"), "PATTERN=P"), (dict(p_overrides=["fc=0.1", "fc=0.2"]), "'fc' given twice"),
    (dict(p_overrides=3), "dict of pattern -> p"),
])
def test_invalid_options_are_clear_errors(options, match):
    with pytest.raises(icrewrite.ConversionError, match=match):
        icrewrite.convert(PATTERNS["chain"](), **options)


# --- statistics of the new IC blocks -------------------------------------------------------------

def test_calibration_sets_ic_statistics_to_the_measured_input_statistics():
    model = randomize_norms(PATTERNS["chain"]()).eval()
    batches = [torch.randn(16, 3, 16, 16) for _ in range(3)]
    converted = icrewrite.convert(model, calibration=batches)
    seen = {}
    handle = model.body[1][0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    x = torch.cat(seen["x"]).transpose(0, 1).reshape(16, -1).double()
    ic = converted.body[1][0].ic
    torch.testing.assert_close(ic.norm.running_mean, x.mean(1).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ic.norm.running_var, x.var(1, unbiased=False).float(), atol=1e-4, rtol=1e-3)
    assert icrewrite.verify(model, converted, batches[0]).ok


def test_fresh_init_uses_standard_batchnorm_initialisation():
    converted = icrewrite.convert(randomize_norms(PATTERNS["chain"]()), init="fresh")
    norm = converted.fc.ic.norm
    assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.running_var, torch.ones(16))


# --- serialisation -------------------------------------------------------------------------------

def test_converted_model_pickles_into_a_fresh_process(tmp_path):
    model = randomize_norms(PATTERNS["residual"]()).eval()
    converted = icrewrite.convert(model)
    x = torch.randn(2, 3, 16, 16)
    torch.save({"model": converted, "x": x, "y": converted(x)}, tmp_path / "m.pt")
    code = ("import torch; d = torch.load(r'%s', weights_only=False); m = d['model'];"
            "assert type(m.conv1).__name__ == 'ICConv2d'; torch.testing.assert_close(m(d['x']), d['y'])")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}  # the test network's module
    subprocess.run([sys.executable, "-c", code % (tmp_path / "m.pt")], check=True, env=env)
    clone = copy.deepcopy(converted)
    assert type(clone.conv1) is type(converted.conv1) and clone.conv1.ic is not converted.conv1.ic


def test_convert_speed_benchmark_runs_in_its_quick_configuration():
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "convert_speed.py")
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, check=True).stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("resnet18"))
    create, convert, ratio = map(float, row[1:])
    assert create > 0 and convert > 0 and 0.01 < ratio < 100


# --- dropout probability per layer ----------------------------------------------------------------

OVERRIDES = {"layer4.0.conv*": 0.2, "layer4.*": 0.1, "fc": 0.0}  # the first match wins


def _block_p(model: nn.Module) -> dict[str, float]:
    return {name: m.ic.p for name, m in model.named_modules() if isinstance(m, ICWeightLayer)}


def test_p_overrides_give_each_matching_layer_its_p_first_match_winning():
    model = randomize_norms(timm_model("resnet10t"), seed=1).eval()
    plan = icrewrite.plan(model, p=0.05, p_overrides=OVERRIDES)
    wanted = {e.target: 0.2 if e.target.startswith("layer4.0.conv") else 0.1 if e.target.startswith("layer4.")
              else 0.0 if e.target == "fc" else 0.05 for e in plan.edits if e.action == "insert-ic"}
    assert {e.target: e.p for e in plan.edits if e.action == "insert-ic"} == wanted
    assert set(wanted.values()) == {0.2, 0.1, 0.0, 0.05}
    data = plan.to_dict()
    assert data["options"]["p_overrides"] == OVERRIDES and data["schema"] == 2
    assert {e["target"]: e["p"] for e in data["edits"] if e["action"] == "insert-ic"} == wanted
    assert icrewrite.Plan.from_dict(data) == plan
    converted = icrewrite.convert(model, p_overrides=OVERRIDES)
    assert _block_p(converted) == wanted
    assert _block_p(icrewrite.convert(timm_model("resnet10t"), plan=icrewrite.Plan.from_dict(data))) == wanted
    assert icrewrite.Options(p_overrides="layer4.0.conv*=0.2,layer4.*=0.1,fc=0") == plan.options
    assert icrewrite.Options(p_overrides="layer4.0.conv*=0.2|layer4.*=0.1|fc=0") == plan.options
    assert icrewrite.Options(p_overrides=[("layer4.0.conv*", 0.2), "layer4.*=0.1", ("fc", 0)]) == plan.options


def test_mixed_p_preserves_the_eval_function_and_p_zero_is_batchnorm_only():
    model = randomize_norms(timm_model("resnet10t"), seed=1).eval()
    converted = icrewrite.convert(model, p_overrides=OVERRIDES)
    x = torch.randn(4, 3, 32, 32)
    report = icrewrite.verify(model, converted, x)
    assert report.ok, report
    fc = converted.fc
    fc.train()
    features = torch.randn(16, 512)
    with torch.no_grad():
        assert torch.equal(fc.ic(features), fc.ic.norm(features))  # p = 0: nothing dropped
        layer4 = converted.layer4[0].conv1.ic.train()
        dropped = (layer4(torch.randn(8, 256, 4, 4)) == 0).float().mean().item()
    assert 0.15 < dropped < 0.25  # p = 0.2 there


def test_export_folding_and_stats_read_each_blocks_own_p():
    from icrewrite.deploy import fold_ic
    from icrewrite.independence import stats

    model = randomize_norms(timm_model("resnet10t"), seed=1).eval()
    converted = icrewrite.convert(model, p_overrides=OVERRIDES).eval()
    x = torch.randn(2, 3, 32, 32)
    folded, _ = fold_ic(converted, input_size=x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), converted(x), rtol=1e-4, atol=1e-5)
    report = stats(converted, [torch.randn(8, 3, 32, 32)], max_pairs=8, max_samples=64)
    assert {s.name: s.p for s in report.sites} == _block_p(converted)


def test_p_override_on_the_command_line_reaches_the_plan_and_the_converted_model(tmp_path, capsys):
    from icrewrite.cli import main

    overrides = [arg for pattern, p in OVERRIDES.items() for arg in ("--p-override", f"{pattern}={p}")]
    assert main(["plan", "resnet10t", "--num-classes", "10", *overrides, "--json", str(tmp_path / "plan.json")]) == 0
    plan = icrewrite.Plan.from_dict(__import__("json").loads((tmp_path / "plan.json").read_text()))
    assert plan.options.p_overrides == tuple(OVERRIDES.items())
    assert main(["convert", "resnet10t", "--num-classes", "10", *overrides, "-o", str(tmp_path / "ic")]) == 0
    assert _block_p(icrewrite.load(tmp_path / "ic")) == {e.target: e.p for e in plan.edits if e.action == "insert-ic"}
    assert main(["convert", "resnet10t", "--num-classes", "10", "--plan", str(tmp_path / "plan.json"),
                 "--p-override", "fc=0.3", "-o", str(tmp_path / "again")]) == 2
    assert "--p-override cannot be given with it" in capsys.readouterr().err
    assert main(["plan", "resnet10t", "--p-override", "fc=1.5"]) == 2
    assert "argument --p-override: p must be in [0, 1), got 1.5" in capsys.readouterr().err


# --- tied weights -----------------------------------------------------------------------------------

class Tied(nn.Module):
    """Two convolutions sharing one weight (``b.weight = a.weight``), each before a BatchNorm and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(self.stem(x))))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean((2, 3)))


def test_tied_weights_stay_tied_and_the_plan_counts_the_model():
    model = randomize_norms(Tied(), seed=1).eval()
    plan = icrewrite.plan(model)
    assert not [e for e in plan.edits if e.action == "fold-norm"]
    kept = {n.target: n for n in plan.notes if n.kind == "kept-norm"}
    assert kept.keys() == {"bn_a", "bn_b"}
    assert "b.weight is a.weight (tied parameters)" in kept["bn_a"].reason + kept["bn_b"].reason
    converted = icrewrite.convert(model)
    assert converted.b.weight is converted.a.weight
    assert sum(p.numel() for p in converted.parameters()) == plan.params_after
    report = icrewrite.verify(model, converted, torch.randn(2, 3, 8, 8))
    assert report.ok and report.param_delta == plan.param_delta, report


def test_a_plan_that_folds_into_a_tied_layer_is_refused_naming_the_tie():
    model = randomize_norms(Tied(), seed=1).eval()
    data = icrewrite.plan(model).to_dict()
    data["edits"].append({"action": "fold-norm", "target": "bn_b", "features": 8, "param_delta": -16 + 8,
                          "detail": "", "into": "b"})
    data["notes"] = [n for n in data["notes"] if n["target"] != "bn_b"]
    data["param_delta"] -= 8
    data["params_after"] -= 8
    with pytest.raises(icrewrite.ConversionError, match=r"\(fold-norm 'bn_b'\): cannot fold: b.weight is a.weight "
                                                        r"\(tied parameters\)"):
        icrewrite.convert(model, plan=icrewrite.Plan.from_dict(data))


def test_a_compare_variant_spec_takes_p_overrides_in_their_string_form():
    from icrewrite.train.compare import parse_variants

    variant = parse_variants("baseline,ic:p_overrides=layer4.*=0.1|fc=0,p=0.1")[1]
    options = icrewrite.Options(**variant.options)
    assert options.p_overrides == (("layer4.*", 0.1), ("fc", 0.0)) and options.p == 0.1


def test_finetune_converts_with_p_overrides_and_keeps_each_blocks_p(tmp_path, capsys):
    from icrewrite.cli import main

    overrides = [arg for pattern, p in OVERRIDES.items() for arg in ("--p-override", f"{pattern}={p}")]
    assert main(["finetune", "resnet10t", "--convert", "--init", "fresh", *overrides, "--data", "digits",
                 "--img-size", "16", "--batch-size", "256", "--epochs", "1", "--no-progress",
                 "-o", str(tmp_path / "run")]) == 0
    trained = icrewrite.load(tmp_path / "run" / "best.safetensors")
    wanted = {e.target: e.p for e in icrewrite.plan(timm_model("resnet10t"), p_overrides=OVERRIDES).edits
              if e.action == "insert-ic"}
    assert _block_p(trained) == wanted
