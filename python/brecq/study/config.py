"""Study configuration (TOML), validated up front with errors that name the offending entry.

    [study]
    name = "qwen3-0.6b-brecq"
    output = "study_out"          # relative paths are relative to this file
    device = "cpu"                # or "cuda"
    dtype = "float32"             # or "bfloat16" (evaluation and measurement)
    attention = "brecq_sdpa"      # or "sdpa": transformers' own (brecq_sdpa runs CPU decode steps
                                  # through brecq_ext's decode-attention kernel, the rest as sdpa)
    fused_norms = true            # Llama/Qwen RMSNorm as one brecq_ext call each (false: transformers')
    seed = 0

    [[models]]
    label = "base"
    path = "models/Qwen3-0.6B"    # a Hugging Face model directory
    role = "base"                 # "base" or "fine-tuned"
    chat_template = false
    [models.calibration]          # needed by brecq and gptq variants
    path = "data/train-squad_v2.parquet"
    columns = ["context", "question"]
    samples = 128
    seq_len = 512

    [[variants]]                  # the unquantized model is always a variant too
    label = "BRECQ W4/W6"
    recipe = "w4g64_mix_attn6"
    method = "brecq"              # brecq, gptq or rtn
    iters = 800                   # optional BRECQ settings: iters, batch_size, lr

    [[datasets]]
    path = "data/test-ai2_arc.parquet"
    task = "arc"                  # arc: log-likelihood for base models, generative for fine-tuned ones;
                                  # or force "arc_loglik" / "arc_gen"; "squad"
    limit = 200                   # optional seeded sample

    [measure]
    prompt_tokens = 128
    decode_tokens = 32
    repeats = 3
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..recipe import PRESETS, Method

ROLES = ("base", "fine-tuned")
TASKS = ("arc", "arc_loglik", "arc_gen", "squad")
ATTENTIONS = ("brecq_sdpa", "sdpa")


class StudyConfigError(ValueError):
    pass


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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _model_path(base: Path, path: str, where: str) -> str:
    """A local model directory, or a hub id ("org/name") left as it is when no such folder exists
    (it is then downloaded by transformers where a network is reachable)."""
    local = _resolve(base, path)
    if Path(local).exists():
        return local
    if HUB_ID.fullmatch(path):
        return path
    raise StudyConfigError(f"{where}: {local} does not exist (and {path!r} is not a hub id 'org/name')")


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
    study = raw.get("study", {})
    name = study.get("name", "study")
    device, dtype = study.get("device", "cpu"), study.get("dtype", "float32")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise StudyConfigError(f"[study]: device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dtype not in ("float32", "bfloat16"):
        raise StudyConfigError(f"[study]: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    attention = study.get("attention", "brecq_sdpa")
    if attention not in ATTENTIONS:
        raise StudyConfigError(f"[study]: attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    fused_norms = study.get("fused_norms", True)
    if not isinstance(fused_norms, bool):
        raise StudyConfigError(f"[study]: fused_norms must be true or false, got {fused_norms!r}")
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
            calib = CalibrationEntry(_exists(_resolve(base, _need(c, "path", where + ".calibration")), where),
                                     tuple(c.get("columns", ())), int(c.get("samples", 128)), int(c.get("seq_len", 512)))
            if calib.samples < 1 or calib.seq_len < 2:
                raise StudyConfigError(f"{where}.calibration: samples must be >= 1 and seq_len >= 2")
        models.append(ModelEntry(label, _model_path(base, _need(m, "path", where), where), role,
                                 bool(m.get("chat_template", False)), calib))
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
        variants.append(VariantEntry(label, recipe, method, v.get("iters"), v.get("batch_size"), v.get("lr")))
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
        limit = d.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise StudyConfigError(f"{where}: limit must be a positive integer, got {limit!r}")
        datasets.append(DatasetEntry(_exists(_resolve(base, _need(d, "path", where)), where), task, limit))
    if not datasets:
        raise StudyConfigError("the study needs at least one [[datasets]] entry")
    m = raw.get("measure", {})
    measure = MeasureEntry(int(m.get("prompt_tokens", 128)), int(m.get("decode_tokens", 32)),
                           int(m.get("repeats", 3)), bool(m.get("memory_subprocess", True)))
    unknown = set(raw) - {"study", "models", "variants", "datasets", "measure"}
    if unknown:
        raise StudyConfigError(f"unknown sections {sorted(unknown)}")
    return StudyConfig(name, _resolve(base, study.get("output", "study_out")), tuple(models), tuple(variants),
                       tuple(datasets), device, dtype, int(study.get("seed", 0)), measure, source, attention,
                       fused_norms)
