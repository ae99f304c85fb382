"""Class names travel with the model, and validation with a subset of the training classes is scored right."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from timm.data import resolve_model_data_config

import icrewrite
from icrewrite.cli import main
from icrewrite.deploy.onnx import export_onnx
from icrewrite.train.data import model_class_names
from icrewrite.train.loop import STATE_FILE
from nets import SMALL_CNN

COLOURS = {"ant": (200, 30, 30), "cat": (30, 200, 30), "dog": (30, 30, 200)}  # each class one hue


def _colour(name: str, n: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + 9 * n - 30, 0, 255)) for c in COLOURS[name])


def _write(root: Path, classes: list[str], per_class: int) -> None:
    """Plain-colour 12x12 PNGs: resize, crop and normalisation keep them plain, so a test can score them alone."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for n in range(per_class):
            Image.new("RGB", (12, 12), _colour(name, n)).save(root / name / f"{n}.png")


def _independent_accuracy(model: torch.nn.Module, val_root: Path, names: list[str]) -> float:
    """Top-1 (%) of ``model`` on every image under ``val_root``, labelled by folder name through ``names``."""
    config = resolve_model_data_config(model)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    images, labels = [], []
    for path in sorted(val_root.glob("*/*.png")):
        rgb = torch.tensor(np.asarray(Image.open(path).convert("RGB"))[0, 0], dtype=torch.float32) / 255
        images.append(((rgb[:, None, None] - mean) / std).expand(3, 16, 16))
        labels.append(names.index(path.parent.name))
    with torch.no_grad():
        predicted = model.eval()(torch.stack(images)).argmax(dim=1)
    return 100.0 * (predicted == torch.tensor(labels)).double().mean().item()


def test_validation_with_a_subset_of_the_classes_scores_as_an_independent_evaluation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "data" / "train", ["ant", "cat", "dog"], per_class=8)
    _write(tmp_path / "data" / "val", ["cat", "dog"], per_class=4)
    out = tmp_path / "run"
    code = main(["finetune", SMALL_CNN, "--data", str(tmp_path / "data"), "--img-size", "16", "--batch-size", "8",
                 "--epochs", "3", "--lr", "0.01", "--workers", "0", "--checkpoint-hist", "2", "--ema",
                 "--no-progress", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "no images of 1 of the 3 training classes (ant)" in capsys.readouterr().err
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    model = icrewrite.load(out / "last.safetensors")
    assert model_class_names(model) == ["ant", "cat", "dog"]
    reported = history[-1]["val_acc"]
    assert reported == pytest.approx(_independent_accuracy(model, tmp_path / "data" / "val", ["ant", "cat", "dog"]),
                                     abs=1e-9)
    assert reported > 50.0  # one hue per class is learnt; read with another index the score was 0%

    written = [out / name for name in ("best.safetensors", "last.safetensors", "ema.safetensors")]
    written += sorted(out.glob("checkpoint-*.safetensors"))
    assert len(written) == 5
    for path in written:
        assert model_class_names(path) == ["ant", "cat", "dog"], path
    assert torch.load(out / STATE_FILE, weights_only=True)["identity"]["class_names"] == ["ant", "cat", "dog"]

    report = export_onnx(model, tmp_path / "model.onnx", input_size=(3, 16, 16))
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(metadata["label_names"]) == ["ant", "cat", "dog"] and report.metadata["label_names"]


def test_a_folder_where_no_image_decodes_is_one_line_and_leaves_no_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for n in range(5):
            (tmp_path / "data" / name / f"{n}.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    assert main(["finetune", SMALL_CNN, "--data", str(tmp_path / "data"), "--img-size", "16", "--workers", "0",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error == f"error: cannot decode image {tmp_path / 'data' / 'a' / '0.jpg'}: not an image file PIL can read"
    assert not out.exists()


def test_class_names_recorded_as_index_mapping_read_in_index_order() -> None:
    """timm also records label names as ``{index: name}``: the model, its file and the ONNX metadata read
    them in class-index order, not as the mapping's keys."""
    from icrewrite import model_info

    model = torch.nn.Linear(2, 3)
    model.pretrained_cfg = {"label_names": {"2": "dog", "0": "ant", "1": "cat"}}
    assert model_info.class_names(model) == model_class_names(model) == ["ant", "cat", "dog"]
    assert model_info.class_names(torch.nn.Linear(2, 3)) is None
    assert model_info.label_names([]) is None and model_info.label_names([0, 1]) == ["0", "1"]
