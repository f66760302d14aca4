"""``brecq study CONFIG.toml``: quantize (cached), evaluate (cached per dataset), measure, report.

Output folder:
    quantized/<model>__<variant>__<key>/   saved quantized models; key = hash of model, recipe,
                                            calibration and settings (reused by later runs)
    runs/<model>/<variant>/<dataset>/       results.json and records.jsonl of each evaluation
    runs/<model>/<variant>/measure.json     storage, latency and memory
    runs/<model>/paired_latency.json        decode latency of all variants timed side by side
    results.json, report.md, plots/*.png
A second run skips every finished step; an interrupted quantization resumes from its last block;
every file is written atomically, so nothing half-written survives.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..baselines import GPTQConfig
from ..calibration import CalibrationSpec
from ..evaluation.runner import Task, evaluate
from ..io import atomic_write_text, load_model_any
from ..measure import cpu_peak_rss, cuda_memory, latency, paired_latency, storage
from ..quantize import quantize_pretrained
from ..recipe import Method, get_recipe
from ..reconstruct import ReconstructionConfig
from .config import ModelEntry, StudyConfig, VariantEntry, slug

log = logging.getLogger("brecq")
UNQUANTIZED = "unquantized"


def _model_identity(path: str) -> dict:
    if not Path(path).is_dir():  # a hub id: its name is its identity
        return {"hub_id": path}
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
    return {p.name: p.stat().st_size for p in files}


def _reconstruction(variant: VariantEntry, seed: int) -> ReconstructionConfig:
    defaults = ReconstructionConfig()
    return ReconstructionConfig(iters=variant.iters or defaults.iters, batch_size=variant.batch_size or defaults.batch_size,
                                lr=variant.lr or defaults.lr, seed=seed)


def quantized_dir(config: StudyConfig, model: ModelEntry, variant: VariantEntry) -> Path:
    key = json.dumps({"model": model.path, "files": _model_identity(model.path), "recipe": variant.recipe,
                      "method": variant.method.value, "calibration": asdict(model.calibration) if model.calibration else None,
                      "reconstruction": asdict(_reconstruction(variant, config.seed)), "seed": config.seed},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(config.output) / "quantized" / f"{slug(model.label)}__{slug(variant.label)}__{digest}"


def _ensure_quantized(config: StudyConfig, model: ModelEntry, variant: VariantEntry, show_progress: bool) -> Path:
    out = quantized_dir(config, model, variant)
    if (out / "config.json").exists():
        log.info("reusing quantized model %s", out)
        return out
    calibration = None
    if variant.method is not Method.RTN:
        c = model.calibration
        calibration = CalibrationSpec(c.path, c.samples, c.seq_len, config.seed, c.columns, model.chat_template)
    log.info("quantizing %s with %s (%s)", model.label, variant.recipe, variant.method.value)
    quantize_pretrained(model.path, str(out), get_recipe(variant.recipe, variant.method), calibration,
                        reconstruction=_reconstruction(variant, config.seed), gptq=GPTQConfig(),
                        device=config.device, show_progress=show_progress)
    return out


def _settings(config: StudyConfig, task: str, limit) -> dict:
    return {"task": task, "limit": limit, "seed": config.seed, "dtype": config.dtype, "device": config.device,
            "attention": config.attention, "fused_norms": config.fused_norms}


def _timing_settings(config: StudyConfig) -> dict:
    """What a latency depends on: cached timings are reused only while these are unchanged."""
    m = config.measure
    return {"prompt_tokens": m.prompt_tokens, "decode_tokens": m.decode_tokens, "repeats": m.repeats,
            "device": config.device, "dtype": config.dtype, "attention": config.attention,
            "fused_norms": config.fused_norms}


def _measure_settings(config: StudyConfig) -> dict:
    return {**_timing_settings(config), "memory_subprocess": config.measure.memory_subprocess}


def _load(config: StudyConfig, path: Path, dtype):
    """A model (and tokenizer) as the study evaluates and times it: on its device, in its dtype,
    with the configured attention and RMS norms."""
    model, tokenizer = load_model_any(path, device=config.device, dtype=dtype)
    if config.attention != "sdpa":
        from ..attention import use_decode_attention

        use_decode_attention(model)
    if config.fused_norms:
        from brecq_ext import fuse_rms_norms_

        fuse_rms_norms_(model)
    return model, tokenizer


def run_study(config: StudyConfig, show_progress: bool = True) -> dict:
    """Run (or resume) a study; returns the results that are also written to results.json."""
    started = time.perf_counter()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    results = {"study": config.name, "config": config.source, "models": {}}
    for model_entry in config.models:
        per_model = {"role": model_entry.role, "path": model_entry.path, "chat_template": model_entry.chat_template,
                     "variants": {}}
        variants = [(UNQUANTIZED, None)] + [(v.label, v) for v in config.variants]
        for label, variant in variants:
            if variant is None:
                path = Path(model_entry.path)
            else:
                path = _ensure_quantized(config, model_entry, variant, show_progress)
            model, tokenizer = _load(config, path, dtype)
            run_dir = out / "runs" / slug(model_entry.label) / slug(label)
            entry = {"path": str(path), "datasets": {}}
            if variant is not None:
                saved = json.loads((path / "config.json").read_text())["quantization_config"]
                entry["quantization"] = {k: saved.get(k) for k in ("recipe", "calibration", "report", "reconstruction",
                                                                    "gptq", "format_version", "tool_version")}
            for dataset in config.datasets:
                task = config.arc_task(dataset, model_entry)
                ds_dir = run_dir / slug(dataset.name)
                settings = _settings(config, task, dataset.limit)
                cached = ds_dir / "results.json"
                if cached.exists() and json.loads(cached.read_text()).get("study_settings") == settings:
                    result = json.loads(cached.read_text())
                else:
                    result = evaluate(model, tokenizer, Task(task), dataset.path, ds_dir, limit=dataset.limit,
                                      seed=config.seed, chat=model_entry.chat_template, show_progress=show_progress,
                                      label=f"{model_entry.label}/{label}")
                    # Written last: a results.json without these settings is never taken as cached.
                    result["study_settings"] = settings
                    atomic_write_text(cached, json.dumps(result, indent=2))
                result["records_file"] = str(ds_dir / "records.jsonl")
                entry["datasets"][dataset.name] = result
            measure_file = run_dir / "measure.json"
            measured = json.loads(measure_file.read_text()) if measure_file.exists() else {}
            if measured.get("settings") == _measure_settings(config):
                entry["measure"] = measured["measure"]
            else:  # never measured, measured with other settings, or by a version that kept no settings
                entry["measure"] = _measure(config, model, path)
                atomic_write_text(measure_file, json.dumps({"settings": _measure_settings(config),
                                                            "measure": entry["measure"]}, indent=2))
            per_model["variants"][label] = entry
            del model
        per_model["paired_latency"] = _paired_latency(config, model_entry, per_model, out, dtype)
        results["models"][model_entry.label] = per_model
    results["seconds"] = time.perf_counter() - started
    from .report import analyse, write_outputs

    results["analysis"] = analyse(results, config)
    write_outputs(results, config)
    return results


def _paired_latency(config: StudyConfig, model_entry, per_model: dict, out: Path, dtype) -> dict:
    """Decode latency of every variant of one model, timed side by side (label -> LatencyReport
    fields), cached in runs/<model>/paired_latency.json. All variants are loaded at once for this."""
    m = config.measure
    paths = {label: entry["path"] for label, entry in per_model["variants"].items()}
    settings = {"paths": paths, **_timing_settings(config)}
    cache_file = out / "runs" / slug(model_entry.label) / "paired_latency.json"
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if cached.get("settings") == settings:
            return cached["latency"]
    log.info("timing the decode of %d variants of %s side by side", len(paths), model_entry.label)
    models = {label: _load(config, Path(path), dtype)[0] for label, path in paths.items()}
    reports = paired_latency(models, m.prompt_tokens, m.decode_tokens, m.repeats)
    del models
    record = {label: asdict(report) for label, report in reports.items()}
    atomic_write_text(cache_file, json.dumps({"settings": settings, "latency": record}, indent=2))
    return record


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
