"""``brecq study CONFIG.toml``: quantize (cached), evaluate (cached per dataset), measure, report.

Every cached artefact is keyed by the content that produced it: the model's files (sha256 of each
weight, config and tokenizer file), the full recipe, method and reconstruction settings, the
calibration spec and its file's sha256, the dataset file's sha256, the evaluation and timing
settings, and the packed format and tool versions. A changed key recomputes; an unchanged one is
reused, and the report lists what was reused. Digests are remembered per (path, size, mtime) in
``.digests.json``, so an unchanged multi-GB model is not hashed again.

Output folder:
    quantized/<model>__<variant>__<key>/   saved quantized models; key = hash of the above (reused
                                            by later runs)
    runs/<model>/<variant>/<dataset>/       results.json and records.jsonl of each evaluation
    runs/<model>/<variant>/measure.json     storage, latency and memory
    runs/<model>/paired_latency.json        decode latency of all variants timed side by side
    results.json, report.md, plots/*.png
A second run skips every finished step; an interrupted quantization resumes from its last block;
every file is written atomically, so nothing half-written survives.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from brecq_ext import FORMAT_VERSION

from .. import __version__
from ..quantization.baselines import GPTQConfig
from ..quantization.calibration import CalibrationSpec
from ..distributed import agree, on_main, rank_device, world
from ..evaluation.runner import Task, evaluate
from ..io import atomic_write_text, load_model_any, sha256_file
from ..measurement.measure import (
    TransformersDecode,
    cpu_peak_rss,
    cuda_memory,
    default_decode,
    latency,
    paired_latency,
    storage,
)
from ..quantization.quantize import quantize_pretrained
from ..quantization.recipe import Method, get_recipe
from ..quantization.reconstruct import ReconstructionConfig
from .config import ModelEntry, StudyConfig, VariantEntry, slug

log = logging.getLogger("brecq")
UNQUANTIZED = "unquantized"
# Paired-latency entries of a variant decoded through transformers, beside its default (C++) path.
TRANSFORMERS_SUFFIX = " (transformers)"
# Bumped when what the decode timing runs changes, so that older timings are not reused.
DECODE_TIMING_VERSION = 2


class StudyBusy(OSError):
    """Another ``brecq study`` holds the output folder (an OSError, as a busy resource is)."""


@contextmanager
def study_lock(out: Path):
    """Hold ``out/.study.lock`` for the run (an OS lock: a killed run releases it); a second run on
    the same folder is refused with the holder's pid, host and start time."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".study.lock"
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open: the lock lives with it)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyBusy(f"{out} is in use by {holder}; wait for it to finish or use another output "
                            "folder") from None
        handle.seek(0)
        handle.truncate()
        started = _dt.datetime.now().isoformat(timespec="seconds")
        handle.write(f"brecq study (pid {os.getpid()} on {socket.gethostname()}, since {started})")
        handle.flush()
        yield
    finally:
        handle.close()


class Digests:
    """sha256 of files, remembered by (path, size, mtime) in the output folder."""

    def __init__(self, out: Path):
        self.file = out / ".digests.json"
        try:
            self.known = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def __call__(self, path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        tag = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = self.known.get(str(path))
        if entry and entry["tag"] == tag:
            return entry["sha256"]
        digest = sha256_file(path)
        self.known[str(path)] = {"tag": tag, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed and world().is_main:  # one writer under torchrun
            atomic_write_text(self.file, json.dumps(self.known, indent=1, sort_keys=True))
            self.changed = False


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")


def _model_identity(path: str, digests: Digests) -> dict:
    """What a model is: a hub id's name, or the sha256 of each of its weight, config and tokenizer
    files."""
    if not Path(path).is_dir():  # a hub id: its name is its identity
        return {"hub_id": path}
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                   and p.name not in ("summary.md",))
    return {p.name: digests(p) for p in files}


def _reconstruction(variant: VariantEntry, seed: int) -> ReconstructionConfig:
    defaults = ReconstructionConfig()
    return ReconstructionConfig(iters=variant.iters or defaults.iters, batch_size=variant.batch_size or defaults.batch_size,
                                lr=variant.lr or defaults.lr, seed=seed)


def quantization_key(config: StudyConfig, model: ModelEntry, variant: VariantEntry, digests: Digests) -> dict:
    """Everything a quantized model depends on."""
    calibration = None
    if model.calibration is not None and variant.method is not Method.RTN:
        calibration = {**asdict(model.calibration), "sha256": digests(model.calibration.path),
                       "chat_template": model.chat_template}
    return {"model": model.path, "files": _model_identity(model.path, digests),
            "recipe": get_recipe(variant.recipe, variant.method).to_dict(), "method": variant.method.value,
            "calibration": calibration, "reconstruction": asdict(_reconstruction(variant, config.seed)),
            "gptq": asdict(GPTQConfig()), "seed": config.seed, "device": config.device,
            "format_version": FORMAT_VERSION, "tool_version": __version__}


def quantized_dir(config: StudyConfig, model: ModelEntry, variant: VariantEntry, digests: Digests) -> Path:
    key = json.dumps(quantization_key(config, model, variant, digests), sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(config.output) / "quantized" / f"{slug(model.label)}__{slug(variant.label)}__{digest}"


def _ensure_quantized(config: StudyConfig, model: ModelEntry, variant: VariantEntry, show_progress: bool,
                      digests: Digests) -> tuple[Path, bool]:
    """The quantized model's folder, and whether it was reused."""
    out = quantized_dir(config, model, variant, digests)
    if on_main(lambda: (out / "config.json").exists(), f"looking for {out}"):  # rank 0's view, on every rank
        log.info("reusing quantized model %s", out)
        return out, True
    # Under torchrun every rank takes part (blocks shared out, or each block's batch split), rank 0 saves.
    calibration = None
    if variant.method is not Method.RTN:
        c = model.calibration
        calibration = CalibrationSpec(c.path, c.samples, c.seq_len, config.seed, c.columns, model.chat_template)
    log.info("quantizing %s with %s (%s)", model.label, variant.recipe, variant.method.value)
    quantize_pretrained(model.path, str(out), get_recipe(variant.recipe, variant.method), calibration,
                        reconstruction=_reconstruction(variant, config.seed), gptq=GPTQConfig(),
                        device=rank_device(config.device), show_progress=show_progress)
    return out, False


def _evaluated_identity(model_entry: ModelEntry, path: Path, quantized: bool, digests: Digests) -> dict:
    """What an evaluation or a timing of this model depends on, besides its settings."""
    if quantized:
        saved = json.loads((path / "config.json").read_text())["quantization_config"]
        return {"quantized": str(path), "weights_sha256": saved.get("weights_sha256"),
                "tool_version": __version__}
    return {"model": model_entry.path, "files": _model_identity(model_entry.path, digests),
            "tool_version": __version__}


def _settings(config: StudyConfig, task: str, limit) -> dict:
    return {"task": task, "limit": limit, "seed": config.seed, "dtype": config.dtype, "device": config.device,
            "attention": config.attention, "fused_norms": config.fused_norms}


def _timing_settings(config: StudyConfig) -> dict:
    """What a latency depends on: cached timings are reused only while these are unchanged."""
    m = config.measure
    return {"prompt_tokens": m.prompt_tokens, "decode_tokens": m.decode_tokens, "repeats": m.repeats,
            "max_seconds": m.max_seconds, "target_interval": m.target_interval,
            "device": config.device, "dtype": config.dtype, "attention": config.attention,
            "fused_norms": config.fused_norms, "decode_timing": DECODE_TIMING_VERSION}


# Bumped when what the memory measurement reads changes (2: VmHWM, not a parent-inherited ru_maxrss).
MEMORY_MEASURE_VERSION = 2


def _measure_settings(config: StudyConfig) -> dict:
    return {**_timing_settings(config), "memory_subprocess": config.measure.memory_subprocess,
            "memory_measure": MEMORY_MEASURE_VERSION}


def _load(config: StudyConfig, path: Path, dtype):
    """A model (and tokenizer) as the study evaluates and times it: on its device, in its dtype,
    with the configured attention and RMS norms."""
    model, tokenizer = load_model_any(path, device=rank_device(config.device), dtype=dtype)
    if config.attention != "sdpa":
        from ..attention import use_decode_attention

        use_decode_attention(model)
    if config.fused_norms:
        from brecq_ext import fuse_rms_norms_

        fuse_rms_norms_(model)
    return model, tokenizer


def run_study(config: StudyConfig, show_progress: bool = True) -> dict:
    """Run (or resume) a study; returns the results that are also written to results.json. Holds
    the output folder's lock for the whole run.

    Under torchrun every rank runs this: rank 0 holds the lock, times and writes; quantization
    (``quantize``) and the evaluations (``brecq.evaluation.runner.evaluate``) are shared out;
    every rank returns the same results."""
    out = Path(config.output)
    w = world()
    with ExitStack() as stack:
        error = None
        if w.is_main:
            try:
                stack.enter_context(study_lock(out))
            except StudyBusy as exc:
                error = exc
        agree(error, "taking the study's output folder")
        return _run_study(config, out, show_progress and w.is_main)


def _run_study(config: StudyConfig, out: Path, show_progress: bool) -> dict:
    started = time.perf_counter()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    digests = Digests(out)
    results = {"study": config.name, "config": config.source, "models": {}, "reused": []}
    for model_entry in config.models:
        per_model = {"role": model_entry.role, "path": model_entry.path, "chat_template": model_entry.chat_template,
                     "variants": {}}
        variants = [(UNQUANTIZED, None)] + [(v.label, v) for v in config.variants]
        for label, variant in variants:
            if variant is None:
                path = Path(model_entry.path)
            else:
                path, reused = _ensure_quantized(config, model_entry, variant, show_progress, digests)
                if reused:
                    results["reused"].append(f"{model_entry.label} / {label}: quantized model {path.name}")
            identity = _evaluated_identity(model_entry, path, variant is not None, digests)
            digests.save()
            model, tokenizer = _load(config, path, dtype)
            run_dir = out / "runs" / slug(model_entry.label) / slug(label)
            entry = {"path": str(path), "datasets": {}, "identity": identity}
            if variant is not None:
                saved = json.loads((path / "config.json").read_text())["quantization_config"]
                entry["quantization"] = {k: saved.get(k) for k in ("recipe", "calibration", "report", "reconstruction",
                                                                    "gptq", "format_version", "tool_version")}
            for dataset in config.datasets:
                task = config.arc_task(dataset, model_entry)
                ds_dir = run_dir / slug(dataset.name)
                settings = {**_settings(config, task, dataset.limit), "chat_template": model_entry.chat_template,
                            "dataset_sha256": digests(dataset.path), "evaluated": identity}
                cached = ds_dir / "results.json"
                previous = on_main(lambda: json.loads(cached.read_text()) if cached.exists() else {},
                                   f"reading {cached}")
                if previous.get("study_settings") == settings:
                    result = previous
                    results["reused"].append(f"{model_entry.label} / {label}: {dataset.name} evaluation")
                else:
                    result = evaluate(model, tokenizer, Task(task), dataset.path, ds_dir, limit=dataset.limit,
                                      seed=config.seed, chat=model_entry.chat_template, show_progress=show_progress,
                                      label=f"{model_entry.label}/{label}", journal_key=settings)
                    # Written last: a results.json without these settings is never taken as cached.
                    result["study_settings"] = settings
                    if world().is_main:
                        atomic_write_text(cached, json.dumps(result, indent=2))
                result["records_file"] = str(ds_dir / "records.jsonl")
                entry["datasets"][dataset.name] = result
            measure_file = run_dir / "measure.json"
            measure_settings = {**_measure_settings(config), "evaluated": identity}

            def measure(model=model, path=path, measure_file=measure_file, measure_settings=measure_settings):
                measured = json.loads(measure_file.read_text()) if measure_file.exists() else {}
                if measured.get("settings") == measure_settings:
                    return measured["measure"], True
                # Never measured, measured with other settings or another model, or by an older version.
                # Under torchrun, rank 0 measures while the other ranks wait, idle, at a barrier.
                record = {**_measure(config, model, path), "measured_on": {"rank": 0, "processes": world().size}}
                atomic_write_text(measure_file, json.dumps({"settings": measure_settings, "measure": record}, indent=2))
                return record, False

            entry["measure"], reused = on_main(measure, f"measuring {model_entry.label} / {label}")
            if reused:
                results["reused"].append(f"{model_entry.label} / {label}: size, latency and memory")
            per_model["variants"][label] = entry
            del model
        per_model["paired_latency"], reused = on_main(
            lambda: _paired_latency(config, model_entry, per_model, out, dtype),
            f"timing the decode of {model_entry.label}")
        if reused:
            results["reused"].append(f"{model_entry.label}: side-by-side decode latency")
        results["models"][model_entry.label] = per_model
    digests.save()
    results["seconds"] = time.perf_counter() - started
    from .report import analyse, write_outputs

    results["analysis"] = analyse(results, config)
    on_main(lambda: write_outputs(results, config), "writing the report")
    return results


def _paired_latency(config: StudyConfig, model_entry, per_model: dict, out: Path, dtype) -> tuple[dict, bool]:
    """Decode latency of every variant of one model, timed side by side (label -> LatencyReport
    fields), cached in runs/<model>/paired_latency.json, and whether the cache was used. All variants
    are loaded at once for this."""
    m = config.measure
    paths = {label: entry["path"] for label, entry in per_model["variants"].items()}
    settings = {"paths": paths, "evaluated": {label: entry["identity"] for label, entry in per_model["variants"].items()},
                **_timing_settings(config)}
    cache_file = out / "runs" / slug(model_entry.label) / "paired_latency.json"
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("settings") == settings:
            return cached["latency"], True
    log.info("timing the decode of %d variants of %s side by side", len(paths), model_entry.label)
    engines = {}
    for label, path in paths.items():
        model = _load(config, Path(path), dtype)[0]
        engines[label] = default_decode(model)  # brecq's C++ runtime on the CPU where it runs the model
        if engines[label].path != TransformersDecode.path:
            engines[label + TRANSFORMERS_SUFFIX] = TransformersDecode(model)  # the same model, beside it
    reports = paired_latency(engines, m.prompt_tokens, m.decode_tokens, m.repeats, max_seconds=m.max_seconds,
                             target_halfwidth=m.target_interval)
    del engines
    record = {label: asdict(report) for label, report in reports.items()}
    atomic_write_text(cache_file, json.dumps({"settings": settings, "latency": record}, indent=2))
    return record, False


def _measure(config: StudyConfig, model, path: Path) -> dict:
    m = config.measure
    weights = path / "model.safetensors"
    record = {"storage": asdict(storage(model, weights if weights.exists() else None)),
              "latency": asdict(latency(model, m.prompt_tokens, m.decode_tokens, m.repeats))}
    device = next(model.parameters()).device
    if device.type == "cuda":
        record["memory"] = {"kind": "cuda", **cuda_memory(model, m.prompt_tokens, m.decode_tokens)}
    elif m.memory_subprocess:
        record["memory"] = {"kind": "cpu_rss", **cpu_peak_rss(path, m.prompt_tokens, m.decode_tokens)}
    return record
