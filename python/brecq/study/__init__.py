"""Studies: several models, each unquantized and quantized, evaluated and measured, reported.

The names below load on first use (``brecq.study.example`` stays importable without torch)."""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {"StudyConfig": ".config", "load_study_config": ".config", "run_study": ".runner"}

__all__ = ["StudyConfig", "load_study_config", "run_study"]


__getattr__ = lazy_attributes(__name__, _LAZY)
