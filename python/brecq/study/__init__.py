"""Studies: several models, each unquantized and quantized, evaluated and measured, reported.

The names below load on first use (``brecq.study.example`` stays importable without torch)."""
from __future__ import annotations

import importlib

_LAZY = {"StudyConfig": ".config", "load_study_config": ".config", "run_study": ".runner"}

__all__ = ["StudyConfig", "load_study_config", "run_study"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brecq.study' has no attribute {name!r}")
