"""Module attributes loaded on first use (PEP 562), so that importing a package stays cheap."""
from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, sources: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``sources[name]`` (a module relative to
    the package) on first access of ``name`` and keeps the value in the package's namespace."""
    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
