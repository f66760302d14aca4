"""Studies: several models, each unquantized and quantized, evaluated and measured, reported."""
from .config import StudyConfig, load_study_config
from .runner import run_study

__all__ = ["StudyConfig", "load_study_config", "run_study"]
