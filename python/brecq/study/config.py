"""Study configuration (TOML), validated up front with errors that name the offending entry:
unknown keys (with the closest valid one), types and ranges, missing files. The format, commented:
``brecq.study.example.EXAMPLE`` (``brecq study --example``); every entry: docs/STUDY.md.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from ..quantization.recipe import PRESETS, Method

ROLES = ("base", "fine-tuned")
TASKS = ("arc", "arc_loglik", "arc_gen", "squad")
ATTENTIONS = ("brecq_sdpa", "sdpa")


class StudyConfigError(ValueError):
    pass


# Every key each table takes; anything else is an error that names the closest of these.
KEYS = {
    "study": ("name", "output", "device", "dtype", "attention", "fused_norms", "seed"),
    "models": ("label", "path", "role", "chat_template", "calibration"),
    "calibration": ("path", "columns", "samples", "seq_len"),
    "variants": ("label", "recipe", "method", "iters", "batch_size", "lr"),
    "datasets": ("path", "task", "limit"),
    "measure": ("prompt_tokens", "decode_tokens", "repeats", "memory_subprocess", "max_seconds", "target_interval"),
}


def _check_keys(table, allowed: tuple, where: str) -> None:
    if not isinstance(table, dict):
        raise StudyConfigError(f"{where}: must be a table, got {type(table).__name__}")
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
            raise StudyConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_all_keys(raw: dict) -> None:
    """Every table's keys, before any other check: a misspelt key is the likeliest mistake."""
    _check_keys(raw.get("study", {}), KEYS["study"], "[study]")
    _check_keys(raw.get("measure", {}), KEYS["measure"], "[measure]")
    for section in ("models", "variants", "datasets"):
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            raise StudyConfigError(f"[[{section}]]: must be an array of tables ([[{section}]] entries)")
        for i, entry in enumerate(entries):
            where = f"[[{section}]] #{i + 1}"
            _check_keys(entry, KEYS[section], where)
            if section == "models" and "calibration" in entry:
                _check_keys(entry["calibration"], KEYS["calibration"], where + ".calibration")


def _integer(table: dict, key: str, default, where: str, minimum: int):
    """An integer entry (TOML integers only: not a string, float or boolean) of at least ``minimum``."""
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise StudyConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise StudyConfigError(f"{where}: '{key}' must be >= {minimum}, got {value}")
    return value


def _number(table: dict, key: str, where: str):
    """An optional positive number."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise StudyConfigError(f"{where}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _seconds(table: dict, key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise StudyConfigError(f"{where}: '{key}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _boolean(table: dict, key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise StudyConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class CalibrationEntry:
    path: str
    columns: tuple = ()
    samples: int = 128
    seq_len: int = 512


@dataclass(frozen=True)
class ModelEntry:
    label: str
    path: str
    role: str
    chat_template: bool = False
    calibration: CalibrationEntry | None = None


@dataclass(frozen=True)
class VariantEntry:
    label: str
    recipe: str
    method: Method
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None


@dataclass(frozen=True)
class DatasetEntry:
    path: str
    task: str
    limit: int | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem


@dataclass(frozen=True)
class MeasureEntry:
    prompt_tokens: int = 128
    decode_tokens: int = 32
    repeats: int = 3
    memory_subprocess: bool = True
    max_seconds: float = 60.0  # side-by-side timing: keep adding repeats until the interval is narrow, or this
    target_interval: float = 0.05  # half-width of the decode-ratio interval, relative, that is narrow enough


@dataclass(frozen=True)
class StudyConfig:
    name: str
    output: str
    models: tuple
    variants: tuple
    datasets: tuple
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    measure: MeasureEntry = field(default_factory=MeasureEntry)
    source: str = ""
    attention: str = "brecq_sdpa"
    fused_norms: bool = True

    def arc_task(self, dataset: DatasetEntry, model: ModelEntry) -> str:
        if dataset.task != "arc":
            return {"arc_loglik": "arc", "arc_gen": "arc_gen", "squad": "squad"}[dataset.task]
        return "arc" if model.role == "base" else "arc_gen"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower() or "x"


def _need(table: dict, key: str, where: str, kind=str):
    if key not in table:
        raise StudyConfigError(f"{where}: missing '{key}'")
    value = table[key]
    if kind is not None and not isinstance(value, kind):
        raise StudyConfigError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _resolve(base: Path, path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else (base / p).resolve())


def _exists(path: str, where: str) -> str:
    if not Path(path).exists():
        raise StudyConfigError(f"{where}: {path} does not exist")
    return path


def _model_path(base: Path, path: str, where: str) -> str:
    """A local model directory, or a hub id ("org/name") left as it is when no such folder exists
    (it is then downloaded by transformers where a network is reachable). An entry that reads as a
    path (``brecq.io.is_hub_id``) must exist: it is never sent to the hub."""
    from ..io import is_hub_id

    local = _resolve(base, str(Path(path).expanduser()))
    if Path(local).exists():
        return local
    if is_hub_id(path, base):
        return path
    raise StudyConfigError(f"{where}: model path {local} does not exist")


def load_study_config(path) -> StudyConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise StudyConfigError(f"{path}: no such study config") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_study_config(raw, base=path.parent, source=str(path))


def parse_study_config(raw: dict, base: Path, source: str = "") -> StudyConfig:
    unknown = set(raw) - {"study", "models", "variants", "datasets", "measure"}
    if unknown:
        key = min(unknown)
        close = difflib.get_close_matches(key, ["study", "models", "variants", "datasets", "measure"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; sections: study, models, variants, datasets, measure"
        raise StudyConfigError(f"unknown section '{key}'{hint}")
    _check_all_keys(raw)
    study = raw.get("study", {})
    name = study.get("name", "study")
    if not isinstance(name, str) or not name:
        raise StudyConfigError(f"[study]: name must be a non-empty string, got {name!r}")
    device, dtype = study.get("device", "cpu"), study.get("dtype", "float32")
    if not isinstance(device, str) or not isinstance(dtype, str):
        raise StudyConfigError(f"[study]: device and dtype must be strings, got {device!r} and {dtype!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise StudyConfigError(f"[study]: device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dtype not in ("float32", "bfloat16"):
        raise StudyConfigError(f"[study]: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    attention = study.get("attention", "brecq_sdpa")
    if attention not in ATTENTIONS:
        raise StudyConfigError(f"[study]: attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    fused_norms = _boolean(study, "fused_norms", True, "[study]")
    seed = _integer(study, "seed", 0, "[study]", 0)
    output = study.get("output", "study_out")
    if not isinstance(output, str) or not output:
        raise StudyConfigError(f"[study]: output must be a folder path, got {output!r}")
    models = []
    for i, m in enumerate(raw.get("models", [])):
        where = f"[[models]] #{i + 1}"
        label = _need(m, "label", where)
        where = f"[[models]] '{label}'"
        role = _need(m, "role", where)
        if role not in ROLES:
            raise StudyConfigError(f"{where}: role must be one of {ROLES}, got {role!r}")
        calib = None
        if "calibration" in m:
            c = m["calibration"]
            cwhere = where + ".calibration"
            columns = c.get("columns", ())
            if not isinstance(columns, (list, tuple)) or not all(isinstance(x, str) for x in columns):
                raise StudyConfigError(f"{cwhere}: 'columns' must be a list of column names, got {columns!r}")
            calib = CalibrationEntry(_exists(_resolve(base, _need(c, "path", cwhere)), cwhere), tuple(columns),
                                     _integer(c, "samples", 128, cwhere, 1), _integer(c, "seq_len", 512, cwhere, 2))
        models.append(ModelEntry(label, _model_path(base, _need(m, "path", where), where), role,
                                 _boolean(m, "chat_template", False, where), calib))
    if not models:
        raise StudyConfigError("the study needs at least one [[models]] entry")
    if len({m.label for m in models}) != len(models):
        raise StudyConfigError("[[models]]: labels must be unique")
    variants = []
    for i, v in enumerate(raw.get("variants", [])):
        where = f"[[variants]] #{i + 1}"
        label = _need(v, "label", where)
        recipe = _need(v, "recipe", f"[[variants]] '{label}'")
        if recipe not in PRESETS:
            raise StudyConfigError(f"[[variants]] '{label}': unknown recipe {recipe!r}; presets: {sorted(PRESETS)}")
        try:
            method = Method(v.get("method", "brecq"))
        except ValueError:
            raise StudyConfigError(f"[[variants]] '{label}': method must be brecq, gptq or rtn") from None
        vwhere = f"[[variants]] '{label}'"
        variants.append(VariantEntry(label, recipe, method, _integer(v, "iters", None, vwhere, 1),
                                     _integer(v, "batch_size", None, vwhere, 1), _number(v, "lr", vwhere)))
        if method is not Method.RTN and any(m.calibration is None for m in models):
            missing = [m.label for m in models if m.calibration is None]
            raise StudyConfigError(f"[[variants]] '{label}': method {method.value} needs [models.calibration] "
                                   f"for every model; missing for {missing}")
    if len({v.label for v in variants}) != len(variants) or any(v.label == "unquantized" for v in variants):
        raise StudyConfigError("[[variants]]: labels must be unique and not 'unquantized'")
    datasets = []
    for i, d in enumerate(raw.get("datasets", [])):
        where = f"[[datasets]] #{i + 1}"
        task = _need(d, "task", where)
        if task not in TASKS:
            raise StudyConfigError(f"{where}: task must be one of {TASKS}, got {task!r}")
        limit = _integer(d, "limit", None, where, 1)
        datasets.append(DatasetEntry(_exists(_resolve(base, _need(d, "path", where)), where), task, limit))
    if not datasets:
        raise StudyConfigError("the study needs at least one [[datasets]] entry")
    m = raw.get("measure", {})
    measure = MeasureEntry(_integer(m, "prompt_tokens", 128, "[measure]", 1),
                           _integer(m, "decode_tokens", 32, "[measure]", 1),
                           _integer(m, "repeats", 3, "[measure]", 1),
                           _boolean(m, "memory_subprocess", True, "[measure]"),
                           _seconds(m, "max_seconds", 60.0, "[measure]"),
                           _number(m, "target_interval", "[measure]") or 0.05)
    return StudyConfig(name, _resolve(base, output), tuple(models), tuple(variants), tuple(datasets), device, dtype,
                       seed, measure, source, attention, fused_norms)
