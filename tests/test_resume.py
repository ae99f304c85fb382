"""Resume exact or refused: everything that shapes a run is recorded in last.pt and compared on resume."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset

import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.cli import main
from icrewrite.errors import DataError
from icrewrite.train.loop import STATE_FILE, FinetuneConfig, TrainingError, finetune

from nets import SMALL_CNN, TINY, tiny_digit_loaders as loaders, tiny_resnet as tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    finetune(tiny(p=0.1), *loaders(), out, epochs=1, progress=False)
    return out


CHANGES = {
    "lr": (lambda: tiny(p=0.1), loaders, {"lr": 0.5}, r"lr 0\.001 -> 0\.5"),
    "batch size": (lambda: tiny(p=0.1), lambda: loaders(batch_size=16), {}, r"train_batch_size 32 -> 16"),
    "image size": (lambda: tiny(p=0.1), lambda: loaders(img_size=12), {}, r"train_input_shape \[3, 8, 8\] -> "),
    "data": (lambda: tiny(p=0.1), lambda: loaders(samples=96), {}, r"train_samples 128 -> 96"),
    "p": (lambda: tiny(p=0.2), loaders, {}, r"\(conversion p 0\.1 -> 0\.2\)"),
    "not converted": (tiny, loaders, {}, r"\(conversion converted -> not converted; model_weights differs\)"),
    "other model": (lambda: create_timm_model("resnet10t", num_classes=10), loaders, {},
                    r"model 'resnet18' -> 'resnet10t'"),
    "weights": (lambda: (torch.manual_seed(1), icrewrite.convert(create_timm_model("resnet18", **TINY), init="fresh",
                                                                 p=0.1))[1], loaders, {}, r"model_weights differs"),
    "mixup": (lambda: tiny(p=0.1), loaders, {"mixup": 0.2}, r"mixup 0\.0 -> 0\.2"),
    "accumulation": (lambda: tiny(p=0.1), loaders, {"grad_accum_steps": 2}, r"grad_accum_steps 1 -> 2"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_resume_with_anything_changed_is_refused_in_one_line_naming_it(finished_run: Path, change: str) -> None:
    make_model, make_loaders, options, message = CHANGES[change]
    before = (finished_run / STATE_FILE).read_bytes()
    with pytest.raises(TrainingError, match=message) as error:
        finetune(make_model(), *make_loaders(), finished_run, epochs=1, resume=True, progress=False, **options)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"cannot resume {finished_run}")
    assert (finished_run / STATE_FILE).read_bytes() == before


def test_what_may_change_on_resume_does(finished_run: Path) -> None:
    """progress and checkpoint_interval change nothing; fewer epochs than the run has are refused."""
    result = finetune(tiny(p=0.1), *loaders(), finished_run, epochs=1, resume=True, progress=True,
                      checkpoint_interval=7)
    assert len(result.history) == 1
    longer = finished_run.parent / "longer"
    finetune(tiny(p=0.1), *loaders(samples=32), longer, epochs=2, progress=False)
    with pytest.raises(TrainingError, match=r"\(epochs 2 -> 1\)"):
        finetune(tiny(p=0.1), *loaders(samples=32), longer, epochs=1, resume=True, progress=False)


def test_more_epochs_on_resume_extend_the_run(tmp_path: Path) -> None:
    """With a schedule that does not depend on the length (``sched="none"``) one epoch extended to two
    is bit-equal to two straight; with cosine, the steps after the resume follow the two-epoch schedule."""
    straight = tiny(p=0.1)
    finetune(straight, *loaders(), tmp_path / "straight", epochs=2, sched="none", progress=False)
    finetune(tiny(p=0.1), *loaders(), tmp_path / "extended", epochs=1, sched="none", progress=False)
    extended = tiny(p=0.1)
    result = finetune(extended, *loaders(), tmp_path / "extended", epochs=2, sched="none", resume=True,
                      progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for name, tensor in params(straight).items():
        assert torch.equal(extended.state_dict()[name], tensor), name

    finetune(tiny(p=0.1), *loaders(), tmp_path / "cosine", epochs=1, progress=False)
    result = finetune(tiny(p=0.1), *loaders(), tmp_path / "cosine", epochs=3, resume=True, progress=False)
    model = tiny(p=0.1)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    schedule = create_scheduler_v2(optimizer, sched="cosine", num_epochs=3, step_on_epochs=False,
                                   updates_per_epoch=4)[0]
    for record in result.history[1:]:
        schedule.step_update(record["step"])
        assert record["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path: Path, workers: int) -> None:
    class Broken(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            if index % 7 == 3:
                raise DataError(f"cannot decode image {index}.png: not an image file PIL can read")
            return torch.zeros(3, 8, 8), 0

    with pytest.raises(DataError) as error:
        finetune(tiny(), DataLoader(Broken(), batch_size=16, num_workers=workers), loaders()[1], tmp_path / "run",
                 epochs=1, progress=False)
    assert re.fullmatch(r"cannot decode image \d+\.png: not an image file PIL can read", str(error.value))  # one line
    assert not (tmp_path / "run").exists()


def test_a_damaged_training_state_is_one_line(tmp_path: Path) -> None:
    finetune(tiny(), *loaders(samples=32), tmp_path, epochs=1, progress=False)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    del state["progress"]
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(TrainingError, match=r"cannot resume from .*last.pt: it is damaged .*KeyError"):
        finetune(tiny(), *loaders(samples=32), tmp_path, epochs=1, resume=True, progress=False)


BAD_NUMBERS = [("--lr", v) for v in ("nan", "inf", "-inf", "0", "-1e-3")] + [
    ("--epochs", "0"), ("--epochs", "-2"), ("--batch-size", "0"), ("--batch-size", "-8"), ("--img-size", "0"),
    ("--img-size", "-16"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--momentum", "1.5"),
    ("--label-smoothing", "1"), ("--clip-grad", "inf"), ("--clip-grad", "-1"), ("--ema-decay", "1"),
    ("--warmup-epochs", "-1"), ("--min-lr", "nan"), ("--checkpoint-interval", "-1"), ("--checkpoint-hist", "0"),
    ("--mixup", "-0.5"), ("--cutmix", "nan"), ("--mixup-prob", "1.5"), ("--mixup-switch-prob", "-1"),
    ("--grad-accum-steps", "0"), ("--layer-decay", "inf"), ("--layer-decay", "0"), ("--reprob", "2"),
    ("--workers", "-1"), ("--seed", "-1"),
]  # --num-classes is a model argument, refused by its argparse type (tests/test_cli_errors.py)


@given(bad=st.lists(st.sampled_from(BAD_NUMBERS), min_size=1, max_size=3, unique_by=lambda b: b[0]),
       resume=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bad_numbers_are_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  bad: list[tuple[str, str]], resume: bool) -> None:
    out = tmp_path / "never"
    command = ["finetune", "no-such-model-is-loaded", "--data", "digits", "-o", str(out)]
    command += [f"{flag}={value}" for flag, value in bad] + (["--resume"] if resume else [])
    assert main(command) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(flag.lstrip("-").replace("-", "_") in lines[0] or flag in lines[0] for flag, _ in bad), lines
    assert STATE_FILE not in lines[0] and not out.exists()


def test_resume_without_convert_or_with_another_model_is_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    command = ["finetune", SMALL_CNN, "--data", "digits", "--img-size", "8", "--batch-size", "256", "--epochs",
               "1", "--no-progress", "-o", str(out)]
    assert main([*command, "--convert"]) == 0
    capsys.readouterr()
    for changed in (command, [*command[:1], "test_efficientnet", *command[2:], "--convert"]):
        assert main([*changed, "--resume"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"error: cannot resume {out} with another setup (")


def test_a_config_rejects_non_finite_numbers_in_python() -> None:
    for value in (math.nan, math.inf):
        with pytest.raises(TrainingError, match="lr must be a finite number > 0"):
            FinetuneConfig(lr=value)
    with pytest.raises(TrainingError, match="grad_accum_steps must be an integer >= 1, got 1.5"):
        FinetuneConfig(grad_accum_steps=1.5)
