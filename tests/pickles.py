"""Objects for pickle-safety tests."""
from __future__ import annotations

import os
from pathlib import Path


class Marker:
    """Unpickling this creates ``path``: the proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Metadata:
    """A harmless object that is still not a tensor: ``weights_only`` loading refuses it."""
