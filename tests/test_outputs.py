"""Outputs are whole or absent: kills, concurrent writers, --force, permissions, stale temporaries.

The kill tests run ``icrewrite.files`` in a subprocess that SIGKILLs itself at a chosen step
(the package is not imported there, so each case takes a fraction of a second); the last test
kills a real ``save`` between writing the weights and publishing the folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

import icrewrite
from icrewrite import CheckpointError, files
from icrewrite.errors import ICRewriteError
from icrewrite.files import TEMP_PREFIX, atomic_folder, atomic_path, clean_stale, scratch_folder

ROOT = Path(__file__).resolve().parents[1]

# A child process: writes OUTPUT (a file, or a folder of two files) holding CONTENT, and
# SIGKILLs itself at POINT: "writing" (the temporary is half written), "finishing" (written,
# not yet published), "published" (renamed into place, temporary not yet cleaned up).
CHILD = r'''
import os, signal, sys, types
package = types.ModuleType("icrewrite")
package.__path__ = [sys.argv[1]]
sys.modules["icrewrite"] = package  # icrewrite.files alone, without importing torch
from icrewrite import files

output, kind, point, content, force = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def then_die(function):
    def wrapped(*args, **kwargs):
        function(*args, **kwargs)
        die()
    return wrapped

if point == "finishing":
    files._finish = die
elif point == "published":
    files._publish_new = then_die(files._publish_new)
    files._publish_replacing = then_die(files._publish_replacing)
elif point == "exchanged":  # a folder replaced with --force: swapped in, the old one not yet removed
    files._renameat2 = then_die(files._renameat2)

if kind == "file":
    with files.atomic_path(output, force=force) as tmp:
        tmp.write_text(content[: len(content) // 2])
        if point == "writing":
            die()
        tmp.write_text(content)
else:
    with files.atomic_folder(output, force=force, replaces=("a", "b")) as tmp:
        (tmp / "a").write_text(content)
        if point == "writing":
            die()
        (tmp / "b").write_text(content)
print("done")
'''


def write_in_child(output: Path, kind: str, point: str, content: str, force: bool = False) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "icrewrite"), str(output), kind, point, content,
                             "1" if force else "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, -9), result.stderr
    return result.returncode


def read_output(output: Path) -> str | None:
    """The content of ``output``: None when absent; asserts that a folder is complete and consistent."""
    if not output.exists():
        return None
    if output.is_file():
        return output.read_text()
    assert sorted(p.name for p in output.iterdir()) == ["a", "b"]
    content = (output / "a").read_text()
    assert (output / "b").read_text() == content
    return content


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("point", ["writing", "finishing", "published", "none"])
def test_a_kill_leaves_no_output_or_the_whole_one(tmp_path, kind, point):
    output = tmp_path / "out"
    code = write_in_child(output, kind, point, "new" * 1000)
    assert code == (0 if point == "none" else -9)
    assert read_output(output) == ("new" * 1000 if point in ("published", "none") else None)
    leftover = temporaries(tmp_path)
    assert bool(leftover) == (point in ("writing", "finishing"))  # a killed writer's temporary (a rename consumes it)
    clean_stale(tmp_path)  # what the next write into the folder does
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("point", ["writing", "finishing", "published", "exchanged"])
def test_a_kill_during_force_leaves_the_old_output_or_the_new_one(tmp_path, kind, point):
    output = tmp_path / "out"
    assert write_in_child(output, kind, "none", "old") == 0
    write_in_child(output, kind, point, "new" * 1000, force=True)
    expected = "old" if point in ("writing", "finishing") else "new" * 1000
    if point == "exchanged" and kind == "file":
        expected = "new" * 1000  # a file is replaced by rename(2), no exchange: the run completes
    assert read_output(output) == expected
    assert write_in_child(output, kind, "none", "next", force=True) == 0  # cleans the temporaries up
    assert read_output(output) == "next" and temporaries(tmp_path) == []


def _race(monkeypatch, write, writers: int = 2) -> list[BaseException | None]:
    """Run ``write(i)`` in threads that all pass the up-front checks, then publish at once."""
    barrier = threading.Barrier(writers)
    publish = files._publish_new

    def together(*args, **kwargs):
        barrier.wait(timeout=30)
        return publish(*args, **kwargs)

    monkeypatch.setattr(files, "_publish_new", together)
    outcomes: list[BaseException | None] = [None] * writers

    def run(i: int) -> None:
        try:
            write(i)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            outcomes[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _one_winner(outcomes: list[BaseException | None]) -> int:
    refused = [err for err in outcomes if err is not None]
    assert len(refused) == len(outcomes) - 1, refused
    assert all(isinstance(err, ICRewriteError) and "output exists" in str(err) and "\n" not in str(err)
               for err in refused), refused
    return outcomes.index(None)


@pytest.mark.parametrize("writers", [2, 4])
def test_of_concurrent_new_files_exactly_one_is_written(tmp_path, monkeypatch, writers):
    path = tmp_path / "plan.json"

    def write(i: int) -> None:
        with atomic_path(path, force=False) as tmp:
            tmp.write_text(f"writer {i}")

    winner = _one_winner(_race(monkeypatch, write, writers))
    assert path.read_text() == f"writer {winner}" and temporaries(tmp_path) == []


@pytest.mark.parametrize("existing_empty", [False, True])
def test_of_concurrent_new_folders_exactly_one_is_written(tmp_path, monkeypatch, existing_empty):
    path = tmp_path / "out"
    if existing_empty:
        path.mkdir()  # an empty folder counts as absent, but only one writer may fill it

    def write(i: int) -> None:
        with atomic_folder(path) as tmp:
            (tmp / "a").write_text(f"writer {i}")
            (tmp / "b").write_text(f"writer {i}")

    winner = _one_winner(_race(monkeypatch, write))
    assert read_output(path) == f"writer {winner}" and temporaries(tmp_path) == []


@pytest.fixture(scope="module")
def converted() -> torch.nn.Module:
    model = timm.create_model("resnet10t", num_classes=4, pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    return icrewrite.convert(model.eval())


@pytest.mark.parametrize("name", ["out", "out.safetensors"])
def test_of_two_concurrent_saves_exactly_one_is_written(tmp_path, monkeypatch, converted, name):
    path = tmp_path / name
    other = timm.create_model("resnet10t", num_classes=4, pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    models = [converted, icrewrite.convert(other.eval(), p=0.2)]
    winner = _one_winner(_race(monkeypatch, lambda i: icrewrite.save(models[i], path)))
    assert icrewrite.load(path).icrewrite_options["p"] == models[winner].icrewrite_options["p"]
    assert isinstance(_race(monkeypatch, lambda i: icrewrite.save(converted, path), 1)[0], CheckpointError)


def test_force_replaces_a_folder_output_whole(tmp_path, converted):
    path = tmp_path / "out"
    icrewrite.save(converted, path)
    other = icrewrite.convert(timm.create_model("resnet10t", num_classes=4).eval(), p=0.2)
    icrewrite.save(other, path, force=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert icrewrite.load(path).icrewrite_options["p"] == 0.2 and temporaries(tmp_path) == []
    (path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds other files \(notes.txt\); it is not replaced"):
        icrewrite.save(converted, path, force=True)
    assert (path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_permissions(tmp_path, converted, umask):
    previous = os.umask(umask)
    try:
        icrewrite.save(converted, tmp_path / "one.safetensors")
        icrewrite.save(converted, tmp_path / "folder")
        with atomic_path(tmp_path / "plain.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(previous)
    for path in [tmp_path / "one.safetensors", tmp_path / "folder" / "model.safetensors",
                 tmp_path / "folder" / "config.json", tmp_path / "plain.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> Path:
    if not path.exists():
        path.write_text("x")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_later_writes_clean_stale_temporaries_only(tmp_path):
    host, live = files._HOST, os.getppid()
    dead = _dead_pid()
    stale = [tmp_path / f"{TEMP_PREFIX}{host}-{dead}-0a0b0c0d-model.safetensors.tmp",
             _age(tmp_path / f"{TEMP_PREFIX}{host}-{live}-0a0b0c0d-old.tmp", 2 * files.STALE_AGE_S),
             _age(tmp_path / f"{TEMP_PREFIX}0badf00d-{live}-0a0b0c0d-other-host.tmp", 2 * files.STALE_AGE_S),
             _age(tmp_path / ".last.pt.abc_1234.tmp", 7200)]  # named by earlier versions, an hour old
    kept = [tmp_path / f"{TEMP_PREFIX}{host}-{live}-0a0b0c0d-in-use.tmp",  # a live writer's
            tmp_path / f"{TEMP_PREFIX}0badf00d-{dead}-0a0b0c0d-other-host.tmp",  # another host's pid: not ours to judge
            tmp_path / ".last.pt.abc_5678.tmp",  # an earlier version's, recent
            tmp_path / "last.pt.tmp", tmp_path / "notes.tmp"]  # a user's files
    for path in kept:
        path.write_text("x")
    stale[0].write_text("x")
    (tmp_path / f"{TEMP_PREFIX}{host}-{dead}-0a0b0c0d-folder.tmp").mkdir()
    stale.append(tmp_path / f"{TEMP_PREFIX}{host}-{dead}-0a0b0c0d-folder.tmp")
    with atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_text("state")
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)


def test_export_scratch_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = tmp_path / f"icrewrite-export-{files._HOST}-{_dead_pid()}-abcd1234"
    killed.mkdir()
    (killed / "dynamo.onnx").write_bytes(b"x" * 100)
    legacy = tmp_path / "icrewrite-export-ab_d1234"
    legacy.mkdir()
    _age(legacy, 7200)
    running = tmp_path / f"icrewrite-export-{files._HOST}-{os.getppid()}-abcd1234"
    running.mkdir()
    with scratch_folder("export") as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(f"icrewrite-export-{files._HOST}-{os.getpid()}-")
    assert not killed.exists() and not legacy.exists() and running.exists() and not scratch.exists()


@pytest.mark.slow
def test_a_save_killed_before_its_folder_is_published_leaves_nothing(tmp_path):
    """The folder layout's weights and config appear together or not at all (a kill after the
    weights were written, before the config)."""
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys, timm, icrewrite\n"
        "from pathlib import Path\n"
        "import icrewrite.checkpoint as checkpoint\n"
        "write = checkpoint._write_weights\n"
        "def write_then_die(*args):\n"
        "    write(*args)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint._write_weights = write_then_die\n"
        "model = timm.create_model('resnet10t', num_classes=4).eval()\n"
        "icrewrite.save(icrewrite.convert(model), sys.argv[1], force=len(sys.argv) > 2)\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, script, out], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    assert not out.exists()
    model = icrewrite.convert(timm.create_model("resnet10t", num_classes=4).eval())
    icrewrite.save(model, out)  # no --force needed: nothing was published; the temporary is cleaned
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert temporaries(tmp_path) == [] and json.loads((out / "config.json").read_text())["icrewrite"]["plan"]
