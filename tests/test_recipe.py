"""timm's recipe on finetune: each flag does what timm's train.py does with it, and resume stays exact."""
from __future__ import annotations

import argparse
import copy
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset, Subset

import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.cli import build_parser, model_from_args
from icrewrite.errors import MissingExtra
from icrewrite.train.data import DigitsDataset, make_dataset
from icrewrite.train.loop import STATE_FILE, FinetuneConfig, World, _Run, finetune

from nets import SMALL_CNN, tiny_digit_loaders as loaders, tiny_resnet as tiny
from test_examples import subprocess_env


pytestmark = pytest.mark.usefixtures("one_thread")


def vit() -> torch.nn.Module:
    """A model in which every sample is computed alone (LayerNorm, no BatchNorm, no dropout)."""
    torch.manual_seed(0)
    return create_timm_model("test_vit", img_size=8, patch_size=4, num_classes=10)


def new_run(model: torch.nn.Module, tmp_path: Path, batch_size: int = 32, **options: object) -> _Run:
    config = FinetuneConfig(progress=False, **options)
    return _Run(model, *loaders(batch_size), tmp_path, config, World(), torch.device("cpu"))


# --- mixup / cutmix -------------------------------------------------------------------------------------------


def test_mixup_mixes_images_and_targets_and_trains_on_soft_targets(tmp_path: Path) -> None:
    run = new_run(tiny(), tmp_path, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, label_smoothing=0.1)
    assert isinstance(run.mixup, Mixup) and isinstance(run.criterion, SoftTargetCrossEntropy)
    images, targets = next(iter(run.train_loader))
    np.random.seed(0)
    mixed, soft = run.mixup(images.clone(), targets)
    assert soft.shape == (32, 10) and torch.allclose(soft.sum(dim=1), torch.ones(32))
    assert not torch.equal(mixed, images)
    # Each soft target mixes the sample's label with its partner's (batch mode pairs i with 31 - i).
    lam = soft[0, targets[0]].item() - 0.1 / 10 if targets[0] != targets[-1] else None
    assert lam is None or 0 < lam < 1
    assert (soft > 0.1 / 10 + 1e-6).sum(dim=1).max() == 2
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(run.model(images), targets, label_smoothing=0.1)
        mixed_loss = run.criterion(run.model(mixed), soft)
    assert not torch.isclose(plain, mixed_loss)


def test_mixup_needs_an_even_batch(tmp_path: Path) -> None:
    with pytest.raises(icrewrite.errors.TrainingError, match="even batch size, got 31"):
        new_run(tiny(), tmp_path, batch_size=31, mixup=0.2)


# --- gradient accumulation ------------------------------------------------------------------------------------


def test_grad_accumulation_of_n_batches_of_b_equals_batches_of_n_times_b(tmp_path: Path) -> None:
    """With a model that computes every sample alone, N accumulated batches of B make the step one batch
    of N*B makes, up to float rounding: the same samples in the same order (the order depends on the seed
    only), the same mean loss and gradient, the same number of optimiser steps. A model with BatchNorm
    differs: its statistics are taken over B samples instead of N*B."""
    accumulated, whole = vit(), vit()
    a = finetune(accumulated, *loaders(batch_size=8), tmp_path / "a", epochs=2, grad_accum_steps=4, opt="sgd",
                 lr=0.05, sched="none", progress=False)
    b = finetune(whole, *loaders(batch_size=32), tmp_path / "b", epochs=2, opt="sgd", lr=0.05, sched="none",
                 progress=False)
    assert [r["step"] for r in a.history] == [r["step"] for r in b.history] == [4, 8]
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert a.final["train_loss"] == pytest.approx(b.final["train_loss"], rel=1e-5)
    assert not torch.equal(accumulated.head.weight, vit().head.weight)  # it trained


def test_grad_accumulation_ends_an_epoch_with_a_shorter_group(tmp_path: Path) -> None:
    run = new_run(tiny(), tmp_path, grad_accum_steps=3)  # 4 batches: a group of 3, then one of 1
    assert run.steps_per_epoch == 2
    run.train_model.train()
    steps = []
    for images, targets in run.train_loader:
        run.train_batch(images, targets)
        steps.append(run.step)
    assert steps == [0, 0, 1, 2]


# --- mixed precision ------------------------------------------------------------------------------------------


def test_fp16_trains_with_a_gradient_scaler_and_saves_its_state(tmp_path: Path) -> None:
    run = new_run(tiny(), tmp_path, amp="fp16", clip_grad=1.0)
    assert run.amp == torch.float16 and isinstance(run.scaler, torch.amp.GradScaler)
    seen = []
    run.model.fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = copy.deepcopy(run.model.fc.weight.detach())
    run.train_model.train()
    images, targets = next(iter(run.train_loader))
    run.train_batch(images, targets)
    assert seen == [torch.float16] and run.step == 1
    assert not torch.equal(run.model.fc.weight, before)
    assert run.state_dict([{}])["scaler"]["scale"] == run.scaler.get_scale()
    assert new_run(tiny(), tmp_path, amp="none").amp is None and new_run(tiny(), tmp_path).scaler is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tmp_path: Path) -> None:
    result = finetune(tiny(p=0.1), *loaders(), tmp_path, epochs=1, amp="fp16", device="cuda", progress=False)
    assert np.isfinite(result.final["train_loss"])


# --- layer decay ----------------------------------------------------------------------------------------------


def _groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted((round(g.get("lr_scale", 1.0), 12), g["weight_decay"],
                   tuple(sorted(names[id(p)] for p in g["params"]))) for g in optimizer.param_groups)


def test_layer_decay_param_groups_are_timms(tmp_path: Path) -> None:
    model, copied = tiny(p=0.1), tiny(p=0.1)
    reference = create_optimizer_v2(copied, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    run = new_run(model, tmp_path, layer_decay=0.7)
    assert _groups(run.optimizer, run.model) == _groups(reference, copied)
    assert len({g["lr_scale"] for g in run.optimizer.param_groups}) > 3
    constant = new_run(tiny(p=0.1), tmp_path, layer_decay=0.7, sched="none")  # no schedule applies the scales
    assert sorted(g["lr"] for g in constant.optimizer.param_groups) == pytest.approx(
        sorted(1e-3 * g["lr_scale"] for g in constant.optimizer.param_groups))


# --- files: best N, EMA, summary.csv, TensorBoard ---------------------------------------------------------------


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hist") / "run"
    finetune(tiny(p=0.1), *loaders(samples=96), out, epochs=3, lr=3e-3, ema=True, ema_decay=0.9, checkpoint_hist=2,
             progress=False)
    return out


def test_checkpoint_hist_keeps_exactly_the_two_best_epochs(three_epochs: Path) -> None:
    history = [json.loads(line) for line in (three_epochs / "metrics.jsonl").read_text().splitlines()]
    ranked = sorted(history, key=lambda r: (-r["val_acc"], r["epoch"]))  # ties keep the earlier epoch
    kept = sorted(p.name for p in three_epochs.glob("checkpoint-*.safetensors"))
    assert kept == sorted(f"checkpoint-{r['epoch']}.safetensors" for r in ranked[:2])
    best = icrewrite.load(three_epochs / "best.safetensors")
    same = icrewrite.load(three_epochs / f"checkpoint-{ranked[0]['epoch']}.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), same.state_dict().values()))
    assert not list(three_epochs.glob("tmp*")) and not (three_epochs / "model_best.safetensors").exists()


def test_ema_weights_are_written_as_a_model(three_epochs: Path) -> None:
    ema = icrewrite.load(three_epochs / "ema.safetensors")
    state = torch.load(three_epochs / STATE_FILE, weights_only=True)["ema"]
    for name, tensor in ema.state_dict().items():
        assert torch.equal(state[f"module.{name}"], tensor), name
    assert not all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(),
                                                     icrewrite.load(three_epochs / "last.safetensors")
                                                     .state_dict().values()))


def test_summary_csv_has_timms_columns_and_the_history(three_epochs: Path) -> None:
    rows = list(csv.DictReader((three_epochs / "summary.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    history = [json.loads(line) for line in (three_epochs / "metrics.jsonl").read_text().splitlines()]
    for row, record in zip(rows, history, strict=True):
        assert int(row["epoch"]) == record["epoch"] and float(row["eval_top1"]) == record["val_acc"]
        assert float(row["train_loss"]) == record["train_loss"] and float(row["eval_top5"]) >= record["val_acc"]


def test_tensorboard_without_the_package_is_one_line(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtra, match=r"pip install 'icrewrite\[tensorboard\]'"):
            finetune(tiny(), *loaders(), tmp_path / "run", epochs=1, log_tensorboard=True, progress=False)
        assert not (tmp_path / "run").exists()
    else:
        finetune(tiny(), *loaders(), tmp_path / "run", epochs=1, log_tensorboard=True, progress=False)
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# --- augmentation and model options -------------------------------------------------------------------------


def test_aa_and_reprob_build_timms_training_transform(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for n in range(5):
            Image.new("RGB", (12, 12), (50 * n, 20, 200)).save(tmp_path / name / f"{n}.png")
    train = make_dataset(str(tmp_path), "train", img_size=8, auto_augment="rand-m9-mstd0.5", re_prob=0.25)
    text = repr(train.dataset.transform)
    assert "RandAugment" in text and "RandomErasing" in text
    val = make_dataset(str(tmp_path), "val", img_size=8, auto_augment="rand-m9-mstd0.5", augment=False)
    assert "RandAugment" not in repr(val.dataset.transform)
    with pytest.raises(icrewrite.errors.DataError, match="--aa, --reprob"):
        make_dataset("digits", "train", auto_augment="rand-m9")


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_model_kwargs_reach_timm_create_model() -> None:
    args = _parse("finetune", SMALL_CNN, "--model-kwargs", "drop_rate=0.25", "num_classes=3", "-o", "x")
    assert args.model_kwargs == {"drop_rate": 0.25, "num_classes": 3}
    model = model_from_args(args)
    assert model.drop_rate == 0.25 and model.num_classes == 3


# --- config file ----------------------------------------------------------------------------------------------


def test_a_config_file_sets_options_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "recipe.yaml"
    config.write_text("lr: 0.01\nbatch_size: 32\ngrad-accum-steps: 2\nmixup: 0.2\nema: true\nno_progress: true\n"
                      "amp: bf16\nmodel_kwargs: {drop_rate: 0.1}\nexclude: [head, 'stem*']\nepochs: 7\n")
    for argv in (["-c", str(config), "--lr", "0.05", "--epochs", "3"], ["--lr=0.05", "-c", str(config), "--epochs=3"]):
        args = _parse("finetune", SMALL_CNN, "-o", "x", *argv)
        assert (args.lr, args.epochs, args.batch_size, args.grad_accum_steps, args.mixup) == (0.05, 3, 32, 2, 0.2)
        assert args.ema and not args.progress and args.amp == "bf16" and args.model_kwargs == {"drop_rate": 0.1}
        assert args.exclude == ["head", "stem*"] and args.opt == "adamw"  # not in the file: the default
    given = _parse("finetune", SMALL_CNN, "-o", "x", "-c", str(config), "--exclude", "fc", "--epochs", "10")
    assert given.exclude == ["fc"] and given.epochs == 10  # given on the command line, equal to the default: kept
    config.write_text(config.read_text().replace("exclude: [head, 'stem*']\n", ""))  # compare's variants hold those
    compare = _parse("compare", SMALL_CNN, "-o", "x", "-c", str(config), "--mixup", "0.5")
    assert (compare.lr, compare.mixup, compare.grad_accum_steps, compare.epochs) == (0.01, 0.5, 2, 7)


OVERRIDABLE = {"lr": (0.01, 0.2), "epochs": (1, 9), "batch_size": (8, 48), "mixup": (0.1, 0.9),
               "grad_accum_steps": (2, 5), "ema": (True, True), "amp": ("bf16", "fp16"), "aa": ("v0", "original")}


@given(in_file=st.sets(st.sampled_from(sorted(OVERRIDABLE))), on_line=st.sets(st.sampled_from(sorted(OVERRIDABLE))),
       dashes=st.booleans(), config_first=st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_config_file_and_command_line_combine_as_documented(tmp_path: Path, in_file: set[str], on_line: set[str],
                                                            dashes: bool, config_first: bool) -> None:
    """Each option: the command line's value if given there, else the file's, else the default."""
    config = tmp_path / "c.yaml"
    config.write_text("".join(f"{k.replace('_', '-') if dashes else k}: {json.dumps(OVERRIDABLE[k][0])}\n"
                              for k in sorted(in_file)))
    line = [part for k in sorted(on_line) for part in
            ([f"--{k.replace('_', '-')}"] if isinstance(OVERRIDABLE[k][1], bool) else
             [f"--{k.replace('_', '-')}", str(OVERRIDABLE[k][1])])]
    file_args = ["-c", str(config)]
    args = _parse("finetune", SMALL_CNN, "-o", "x", *(file_args + line if config_first else line + file_args))
    defaults = _parse("finetune", SMALL_CNN, "-o", "x")
    for key, (from_file, from_line) in OVERRIDABLE.items():
        expected = from_line if key in on_line else from_file if key in in_file else getattr(defaults, key)
        assert getattr(args, key) == expected, key


@pytest.mark.parametrize("text, message", [
    ("lrate: 0.1\n", "unknown option 'lrate'"),
    ("lr: fast\n", "lr must be of type float"),
    ("ema: 3\n", "ema must be true or false"),
    ("amp: fp8\n", "amp must be one of bf16, fp16, none"),
    ("num-classes: 0\n", "num-classes: must be at least 1, got 0"),
    ("num_classes: ten\n", "num_classes: expected an integer, got 'ten'"),
    ("- lr\n", "must be a mapping"),
])
def test_a_bad_config_file_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        message: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        _parse("finetune", SMALL_CNN, "-o", "x", "-c", str(tmp_path / "c.yaml"))
    assert exit_.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_config_file_without_pyyaml_names_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(SystemExit):
        _parse("finetune", SMALL_CNN, "-o", "x", "-c", str(tmp_path / "c.yaml"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "yaml is not installed; it comes with pip install 'icrewrite[train]'" in lines[0]


# --- resume with the recipe on ----------------------------------------------------------------------------------

RECIPE = dict(mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, grad_accum_steps=2, ema=True, ema_decay=0.9,
              checkpoint_hist=2)


class Crash(Exception):
    pass


class CrashAfter(Dataset):
    """Raises after ``limit`` samples: an in-process stand-in for a killed run."""

    def __init__(self, dataset: Dataset, limit: int | None) -> None:
        self.dataset, self.limit, self.served = dataset, limit, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> object:
        self.served += 1
        if self.limit is not None and self.served > self.limit:
            raise Crash
        return self.dataset[index]


def _recipe_run(out: Path, crash_after: int | None, resume: bool = False) -> torch.nn.Module:
    model = tiny(p=0.1)
    train = DataLoader(CrashAfter(Subset(DigitsDataset("train", 8), range(192)), crash_after), batch_size=16,
                       drop_last=True)
    val = DataLoader(Subset(DigitsDataset("test", 8), range(64)), batch_size=64)
    finetune(model, train, val, out, epochs=2, lr=3e-3, checkpoint_interval=2, resume=resume, progress=False,
             **RECIPE)
    return model


def test_an_interrupted_run_with_the_recipe_on_resumes_bit_equal(tmp_path: Path) -> None:
    straight = _recipe_run(tmp_path / "straight", None)
    with pytest.raises(Crash):
        _recipe_run(tmp_path / "crashed", crash_after=16 * 17 + 5)  # epoch 2, step 8 saved, batch 17 in flight
    saved = torch.load(tmp_path / "crashed" / STATE_FILE, weights_only=True)["progress"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 4, 8)
    resumed = _recipe_run(tmp_path / "crashed", None, resume=True)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    a, b = (torch.load(tmp_path / d / STATE_FILE, weights_only=True) for d in ("straight", "crashed"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["history"] == [{**r, "epoch_time_s": a["history"][i]["epoch_time_s"]} for i, r in enumerate(b["history"])]
    assert sorted(p.name for p in (tmp_path / "crashed").glob("checkpoint-*")) == \
        sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*"))


SCRIPT = """
import sys, time
import torch
from torch.utils.data import DataLoader, Dataset, Subset
import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.train.data import DigitsDataset
from icrewrite.train import finetune

class Slowed(Dataset):  # gives the test time to kill the run mid-epoch
    def __init__(self, dataset): self.dataset = dataset
    def __len__(self): return len(self.dataset)
    def __getitem__(self, i): time.sleep(0.002); return self.dataset[i]

torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = create_timm_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
model = icrewrite.convert(model, init="fresh", p=0.1)
train = DataLoader(Slowed(Subset(DigitsDataset("train", 8), range(384))), batch_size=16, drop_last=True)
val = DataLoader(Subset(DigitsDataset("test", 8), range(64)), batch_size=64)
finetune(model, train, val, out, epochs=2, lr=3e-3, checkpoint_interval=2, resume=mode == "resume", progress=False,
         mixup=0.8, cutmix=1.0, grad_accum_steps=2, ema=True, ema_decay=0.9)
"""


@pytest.mark.slow
def test_a_killed_run_with_the_recipe_on_resumes_bit_equal(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)

    def start(out: Path, mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(out), mode], env=subprocess_env(),
                                stderr=subprocess.PIPE, text=True)

    straight = start(tmp_path / "straight", "fresh")
    killed_out = tmp_path / "killed"
    killed = start(killed_out, "fresh")
    deadline = time.monotonic() + 240
    while killed.poll() is None and time.monotonic() < deadline:
        if (killed_out / STATE_FILE).exists():
            if torch.load(killed_out / STATE_FILE, weights_only=True)["progress"]["step"] >= 10:  # epoch 1, mid-way
                break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    at = torch.load(killed_out / STATE_FILE, weights_only=True)["progress"]
    assert at["epoch"] == 0 and 0 < at["batch"] < 24, at
    for process in (start(killed_out, "resume"), straight):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    a, b = (torch.load(tmp_path / d / STATE_FILE, weights_only=True) for d in ("straight", "killed"))
    assert a["progress"]["step"] == b["progress"]["step"] == 24
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(b[part][name], tensor), (part, name)
