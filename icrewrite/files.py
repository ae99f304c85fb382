"""Write outputs whole or not at all, never silently over another writer's, and clean up after kills.

An output (a file, or a folder such as the Hugging Face layout) is written under a temporary
sibling name and published by one rename: a reader, or a process killed at any point, sees
the old state or the new one, never half of it. A new output is published with
``renameat2(RENAME_NOREPLACE)`` (``link`` for files where that is missing), so of two
concurrent writers exactly one succeeds and the other is refused; ``force`` replaces a file
with ``rename`` and a folder with ``renameat2(RENAME_EXCHANGE)``, both atomic. Written files
get the permissions of the umask (0644 under 022), as ``open`` and ``torch.save`` give.

Temporaries are named ``.icrewrite-tmp-HOST-PID-...`` (scratch folders in the system temp
folder ``icrewrite-export-HOST-PID-...``); a later write into the same folder removes those
whose process is gone, and any older than :data:`STALE_AGE_S`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from .errors import ICRewriteError, few, shortened

__all__ = ["refuse_overwrite", "atomic_path", "atomic_folder", "scratch_folder", "clean_stale", "TEMP_PREFIX"]

TEMP_PREFIX = ".icrewrite-tmp-"  # temporaries next to an output
SCRATCH_PREFIX = "icrewrite-"  # scratch folders in the system temp folder: icrewrite-PURPOSE-HOST-PID-...
STALE_AGE_S = 24 * 3600  # a temporary this old is stale whoever made it (another host, a reused pid)
_LEGACY_AGE_S = 3600  # temporaries named by earlier versions (.NAME.XXXXXXXX.tmp, icrewrite-export-XXXXXXXX)
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OWNED = re.compile(r"^(?:\.icrewrite-tmp|icrewrite-[a-z]+)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _libc_renameat2() -> object | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no renameat2: not glibc >= 2.28 (macOS, older musl, Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2_function = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    if _renameat2_function is None:
        return False
    if _renameat2_function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


# --- checks before any work ---------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _check_names(path: Path, error: type[ICRewriteError]) -> None:
    """Every component of ``path`` (and the temporary named after it) fits the file system."""
    limit = _NAME_MAX
    with contextlib.suppress(OSError, ValueError, AttributeError):
        limit = os.pathconf(_existing_ancestor(path), "PC_NAME_MAX")
    long = [part for part in path.parts if len(os.fsencode(part)) > limit]
    if long:
        raise error(f"{shortened(long[0], 60)}: name too long for the file system ({len(os.fsencode(long[0]))} bytes, "
                    f"at most {limit})")


def _check_writable(path: Path, error: type[ICRewriteError]) -> None:
    """Create and remove a temporary in the folder ``path`` goes to (or its nearest existing
    ancestor): read-only mounts and permissions are found before the work, not after."""
    folder = _existing_ancestor(path)
    if not folder.is_dir():
        raise error(f"cannot write {path}: {folder} is a file, not a folder")
    probe = folder / _temp_name(TEMP_PREFIX, "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise error(f"cannot write {path}: {folder} is not writable ({err.strerror or err})") from err
    probe.unlink(missing_ok=True)


def refuse_overwrite(path: str | os.PathLike, *, folder: bool = False, force: bool = False,
                     replaces: Collection[str] = (), error: type[ICRewriteError] = ICRewriteError) -> Path:
    """Raise ``error`` (one line) unless ``path`` can be written as asked; returns it as a Path.

    Checked before any work: that no name is too long, that the folder it goes to is
    writable, that an existing ``path`` is of the kind written (a file, or with
    ``folder=True`` a folder: an existing folder is never replaced by a file nor a file by a
    folder), and that it is replaced only with ``force`` (``--force``): an empty folder counts
    as absent; with ``force`` a folder is replaced only when it holds nothing but the names in
    ``replaces`` (what this output writes), so a user's other files are never deleted.
    """
    path = Path(path)
    _check_names(path, error)
    if path.is_symlink() or path.exists():
        if not folder and path.is_dir():
            raise error(f"{path} is a folder; a file is written there (--force replaces files, not folders)")
        if folder and not path.is_dir():
            raise error(f"{path} is a file; a folder is written there (--force does not replace a file by a folder)")
        contents = sorted(p.name for p in path.iterdir()) if folder else [path.name]
        if contents and not force:
            raise error(f"output exists: {path}; pass --force (force=True) to overwrite it")
        others = [name for name in contents if name not in replaces] if folder else []
        if others:
            raise error(f"{path} holds other files ({few(others)}); it is not replaced: choose another output")
    _check_writable(path, error)
    return path


# --- temporaries ----------------------------------------------------------------------------


def _temp_name(prefix: str, name: str) -> str:
    """A temporary's name: ``prefix`` + host + pid + random + as much of ``name`` as fits."""
    tag = f"{prefix}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}-"
    room = _NAME_MAX - len(tag.encode()) - len(".tmp")
    return tag + os.fsdecode(os.fsencode(name)[:room]) + ".tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _stale(entry: Path, legacy: re.Pattern[str] | None, now: float) -> bool:
    try:
        age = now - entry.lstat().st_mtime
    except OSError:
        return False
    owner = _OWNED.match(entry.name)
    if owner is not None:
        pid = int(owner["pid"])
        mine = owner["host"] == _HOST
        return age > STALE_AGE_S or (mine and pid != os.getpid() and not _alive(pid))
    return legacy is not None and legacy.fullmatch(entry.name) is not None and age > _LEGACY_AGE_S


def clean_stale(folder: str | os.PathLike, legacy: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` left by killed processes; returns those removed.

    ``legacy`` is a regular expression for names earlier versions gave temporaries (removed
    when older than an hour). Errors are ignored: cleaning is a courtesy, not the work.
    """
    folder = Path(folder)
    pattern = re.compile(legacy) if legacy else None
    now = time.time()
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not (entry.name.startswith((TEMP_PREFIX, SCRATCH_PREFIX)) or (pattern and pattern.fullmatch(entry.name))):
                continue
            if _stale(entry, pattern, now):
                with contextlib.suppress(OSError):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
    return removed


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the umask's permissions and
    flush it to disk. Writers that replace the file they are given (safetensors renames its
    own temporary over it, with mode 0600) lose the mode set at creation, hence after."""
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _legacy(name: str) -> str:
    return re.escape(f".{name}.") + r"[A-Za-z0-9_]{8}\.tmp"


# --- publishing -----------------------------------------------------------------------------


def _publish_new(tmp: Path, path: Path, error: type[ICRewriteError]) -> None:
    """Rename ``tmp`` to ``path`` only if ``path`` does not exist (an empty folder counts as
    absent), in one step: a second writer is refused, not silently replaced."""
    taken = error(f"output exists: {path} (written meanwhile by another process); nothing was replaced: "
                  "pass --force (force=True) to overwrite it")
    try:
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # another writer removed it first: the rename decides
                os.rmdir(path)  # an empty folder; fails if another writer has filled it since
        if _renameat2(tmp, path, _RENAME_NOREPLACE):
            return
        if tmp.is_dir():
            os.rename(tmp, path)  # onto a non-empty folder or a file this fails
        else:
            os.link(tmp, path)  # fails if path exists
            tmp.unlink()
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as err:
        raise taken from err
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise taken from err
        raise


def _publish_replacing(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` in one step, replacing what is there (``force``)."""
    if not tmp.is_dir() or not path.is_dir():
        os.replace(tmp, path)  # a file onto a file, or a folder onto nothing: atomic
        return
    if not _renameat2(tmp, path, _RENAME_EXCHANGE):  # without it: two renames, old kept under a temporary name
        old = path.parent / _temp_name(TEMP_PREFIX, path.name)
        os.rename(path, old)
        os.rename(tmp, path)
        tmp = old
    shutil.rmtree(tmp)  # the old folder, now under the temporary name


def _publish(tmp: Path, path: Path, force: bool, error: type[ICRewriteError]) -> None:
    """Finish ``tmp`` (permissions, flushed) and rename it to ``path``: replacing what is there
    with ``force``, else only if nothing is."""
    _finish(tmp)
    if force:
        _publish_replacing(tmp, path)
    else:
        _publish_new(tmp, path, error)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True, error: type[ICRewriteError] = ICRewriteError
                ) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; publish it as ``path`` when the block succeeds.

    On an exception the temporary is removed and ``path`` is left as it was. With
    ``force=False`` an existing ``path`` is an ``error``, checked before the block and again,
    atomically, when publishing (a concurrent writer that got there first wins).
    """
    path = refuse_overwrite(path, force=force, error=error)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, _legacy(path.name))
    tmp = path.parent / _temp_name(TEMP_PREFIX, path.name)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        yield tmp
        _publish(tmp, path, force, error)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, force: bool = False, replaces: Collection[str] = (),
                  error: type[ICRewriteError] = ICRewriteError) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; publish it as ``path`` by one rename when the
    block succeeds (see :func:`refuse_overwrite` for ``force`` and ``replaces``).

    A kill at any point leaves ``path`` as it was, or complete.
    """
    path = refuse_overwrite(path, folder=True, force=force, replaces=replaces, error=error)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = path.parent / _temp_name(TEMP_PREFIX, path.name)
    tmp.mkdir(0o777)
    try:
        yield tmp
        _publish(tmp, path, force, error)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(purpose: str) -> Iterator[Path]:
    """A private folder in the system temp folder, removed after the block; those of killed
    processes (``icrewrite-PURPOSE-HOST-PID-...``) are removed when the next one is made."""
    root = Path(tempfile.gettempdir())
    clean_stale(root, legacy=re.escape(f"icrewrite-{purpose}-") + r"[A-Za-z0-9_]{8}")
    with tempfile.TemporaryDirectory(prefix=f"icrewrite-{purpose}-{_HOST}-{os.getpid()}-") as folder:
        yield Path(folder)
