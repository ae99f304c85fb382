"""Modules of icrewrite 0.1.0 that moved, still importable under their old names.

Whole models pickled with ``torch.save(model)`` name the module of each class they hold
(``icrewrite.attention.RoutedMultiheadAttention``, ``icrewrite.fold.BorderCorrectedConv2d``);
an import of an old name gets the module that holds those classes now.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED = {  # old name -> where its classes are now
    "icrewrite.attention": "icrewrite.layers.attention",
    "icrewrite.fast_ic": "icrewrite.layers.fast",
    "icrewrite.fold": "icrewrite.deploy.fold",
    "icrewrite.train.demo": "icrewrite.apps.demo",
    "icrewrite.train.plot": "icrewrite.plot",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module it stands for is already executed


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # first: these names are the package's, whatever else is installed
