"""Fine-tuning: it learns, resumes exactly after SIGKILL, runs on 2 Gloo ranks, stops on NaN."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.compat import TIMM_RECORDS_MODEL_ARGS
from icrewrite.errors import CheckpointError
from icrewrite.train.data import digits_loaders
from icrewrite.train.loop import STATE_FILE, LossNotFinite, TrainingError, finetune

from nets import TINY
from test_examples import subprocess_env

# One training run as its own process: the way a user's job runs, so it can be killed.
SCRIPT = """
import os, sys, time
import timm, torch
from torch.utils.data import DataLoader, Dataset, Subset
import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.train.data import DigitsDataset
from icrewrite.train import finetune

class Slowed(Dataset):  # gives the test time to kill the run mid-epoch
    def __init__(self, dataset): self.dataset = dataset
    def __len__(self): return len(self.dataset)
    def __getitem__(self, i): time.sleep(0.001); return self.dataset[i]

torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = create_timm_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=10)  # records them
model = icrewrite.convert(model, init="fresh", p=0.1)  # dropout: resuming must restore the RNG too
train = DataLoader(Slowed(Subset(DigitsDataset("train", 16), range(384))), batch_size=32, drop_last=True)
val = DataLoader(Subset(DigitsDataset("test", 16), range(128)), batch_size=128)
finetune(model, train, val, out, epochs=2, lr=3e-3, checkpoint_interval=2, resume=mode == "resume", progress=False)
if mode == "ddp":
    torch.save(model.state_dict(), f"{out}/rank{os.environ['RANK']}.pt")
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_timm_model("resnet18", **TINY)  # records its arguments for the checkpoints, on every timm


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "run.py"
    path.write_text(SCRIPT)
    return path


def _start(script: Path, out: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=subprocess_env(), stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def _state(out: Path) -> dict:
    return torch.load(out / STATE_FILE, weights_only=True)


def test_finetune_learns_and_writes_its_files(tmp_path: Path) -> None:
    model = _tiny_model()
    train, val = digits_loaders(batch_size=32, img_size=16)
    result = finetune(model, train, val, tmp_path, epochs=2, lr=3e-3, ema=True, clip_grad=1.0, progress=False)

    assert result.final["val_acc"] > 60.0  # chance is 10%
    assert result.final["train_loss"] < result.history[0]["train_loss"]
    assert "ema_val_acc" in result.final
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == result.history and [r["epoch"] for r in logged] == [1, 2]
    assert (tmp_path / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert _state(tmp_path)["progress"]["epoch"] == 2
    # The model files rebuild the trained model: the last one is the final weights.
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(icrewrite.load(tmp_path / "last.safetensors")(x), model.eval()(x), atol=1e-5)
    best = icrewrite.load(tmp_path / "best.safetensors")
    assert sum(p.numel() for p in best.parameters()) == sum(p.numel() for p in model.parameters())


def _refusals(model: torch.nn.Module, tmp_path: Path) -> tuple[str, str]:
    """What ``save`` and ``finetune`` say of ``model``; finetune must say it before it trains or writes anything."""
    train, val = digits_loaders(batch_size=256, img_size=8)
    with pytest.raises(CheckpointError) as by_save:
        icrewrite.save(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as by_finetune:
        finetune(model, train, val, tmp_path / "run", epochs=1, progress=False)
    assert not (tmp_path / "run").exists()
    return str(by_save.value), str(by_finetune.value)


def test_a_model_save_refuses_is_refused_before_training(tmp_path: Path) -> None:
    by_save, by_finetune = _refusals(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10)), tmp_path)
    assert by_finetune == by_save and "only models made by timm.create_model" in by_save


@pytest.mark.skipif(TIMM_RECORDS_MODEL_ARGS, reason="timm >= 1.0.31 records the builder arguments itself")
def test_a_model_whose_file_would_rebuild_another_architecture_is_refused_before_training(tmp_path: Path) -> None:
    """timm <= 1.0.30 does not record ``stem_width=8``: no checkpoint could rebuild the model."""
    by_save, by_finetune = _refusals(timm.create_model("resnet18", **TINY), tmp_path)
    assert by_finetune == by_save and "would rebuild another architecture" in by_save


def test_an_existing_run_is_not_overwritten_and_resume_needs_the_same_options(tmp_path: Path) -> None:
    train, val = digits_loaders(batch_size=256, img_size=8)
    finetune(_tiny_model(), train, val, tmp_path, epochs=1, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        finetune(_tiny_model(), train, val, tmp_path, epochs=1, progress=False)
    with pytest.raises(TrainingError, match="lr"):
        finetune(_tiny_model(), train, val, tmp_path, epochs=1, lr=0.5, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = _tiny_model()
    calls = []

    def poison(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return output * float("nan") if len(calls) > 5 else output

    model.fc.register_forward_hook(poison)
    train, val = digits_loaders(batch_size=32, img_size=8)
    with pytest.raises(LossNotFinite, match="step 6") as error:
        finetune(model, train, val, tmp_path, epochs=1, checkpoint_interval=2, progress=False)
    assert str(tmp_path / STATE_FILE) in str(error.value)
    state = _state(tmp_path)
    assert state["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied


def test_killed_run_resumes_to_the_same_parameters(script: Path, tmp_path: Path) -> None:
    uninterrupted = _start(script, tmp_path / "straight", "fresh")
    killed_out = tmp_path / "killed"
    killed = _start(script, killed_out, "fresh")
    deadline = time.monotonic() + 240
    while not (killed_out / STATE_FILE).exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = _state(killed_out)["progress"]
    assert interrupted_at["epoch"] == 0 and 0 < interrupted_at["batch"] < 12  # killed mid-epoch

    _finish(_start(script, killed_out, "resume"))
    _finish(uninterrupted)
    resumed, straight = _state(killed_out), _state(tmp_path / "straight")
    assert resumed["progress"]["step"] == straight["progress"]["step"] == 24
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["val_acc"] for r in resumed["history"]] == [r["val_acc"] for r in straight["history"]]
    logged = [json.loads(line) for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [1, 2]


def test_two_gloo_ranks_end_with_identical_parameters(script: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(tmp_path), "ddp"]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Each rank took half the steps of a single process, and only rank 0 logged.
    assert _state(tmp_path)["progress"]["step"] == 2 * (384 // 2 // 32)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_finetune_converts_trains_and_refuses_to_overwrite(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from icrewrite.cli import main
    from icrewrite.layers import ICWeightLayer

    out = tmp_path / "run"
    command = ["finetune", "resnet10t", "--convert", "--init", "fresh", "--data", "digits", "--img-size", "16",
               "--batch-size", "128", "--epochs", "1", "--no-progress", "-o", str(out)]
    assert main(command) == 0
    assert "best:  val acc" in capsys.readouterr().out
    trained = icrewrite.load(out / "best.safetensors")
    assert trained.num_classes == 10  # timm's 1000 classes replaced to fit the data
    assert any(isinstance(m, ICWeightLayer) for m in trained.modules())

    assert main(command) == 2
    assert "already holds a run" in capsys.readouterr().err
