"""Write files so that a reader never sees a half-written one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ICRewriteError


def refuse_existing(path: str | os.PathLike) -> None:
    """Raise ``ICRewriteError`` when ``path`` exists: outputs are only replaced with ``--force``."""
    if Path(path).exists():
        raise ICRewriteError(f"{path} exists; pass --force (force=True) to overwrite it")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    With ``force=False`` an existing ``path`` is an error instead of being replaced.
    """
    path = Path(path)
    if not force:
        refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
