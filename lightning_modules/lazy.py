"""Lazy package exports (PEP 562): a package's public names, imported on first use.

``experiments.config`` imports the packages' ``config`` modules, and loading a configuration
should not pull in torch, torchvision, Lightning, lightly and normflows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]
                 ) -> tuple[Callable[[str], object], list[str]]:
    """``{module: [names]}`` -> the package's ``(__getattr__, __all__)``."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(where)
