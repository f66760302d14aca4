"""Resource measurement of a causal LM: parameters and storage, memory, and latency.

Every record is stamped with the device, dtype, threads and library versions. A timing that comes
out zero or missing is an error, never a result.
"""
from __future__ import annotations

import inspect
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from brecq_ext import QuantLinear, RMSNorm, cpu_isa


class MeasurementError(RuntimeError):
    pass


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    import brecq_ext

    env = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "brecq": brecq_ext.__version__,
           "cpu_kernels": cpu_isa(), "python": platform.python_version(), "machine": platform.machine(),
           "processor": _cpu_model()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# --- parameters and storage ------------------------------------------------------------------
def module_group(name: str) -> str:
    if "self_attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    if "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "other"


@dataclass
class StorageReport:
    parameters: int  # logical parameters (a packed weight counts its in x out entries)
    parameters_by_bits: dict  # bits (e.g. "4", "6", "32") -> parameters stored at that width
    weight_bytes: int  # bytes of all parameters and persistent buffers, tied tensors once
    bits_per_weight: float  # weight_bytes * 8 / parameters
    groups: dict  # module group -> {"parameters", "bytes", "bits_per_weight"}
    disk_bytes: int | None = None  # size of the weights file, when the model was loaded from one


def storage(model: nn.Module, weights_file: str | Path | None = None) -> StorageReport:
    seen: set[int] = set()
    by_bits: dict[str, int] = defaultdict(int)
    groups: dict[str, dict] = defaultdict(lambda: {"parameters": 0, "bytes": 0})
    total_params = total_bytes = 0
    quant_names = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quant_names.add(name)
            params = module.in_features * module.out_features
            nbytes = module.memory_bytes() - (module.bias.numel() * module.bias.element_size() if module.bias is not None else 0)
            by_bits[str(module.bits)] += params
            g = groups[module_group(name)]
            g["parameters"] += params
            g["bytes"] += nbytes
            total_params += params
            total_bytes += nbytes
            for t in module.buffers():
                seen.add(id(t))
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + [
            (n, b) for n, b in model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in seen or not _persistent(model, name):
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        total_bytes += nbytes
        g = groups[module_group(name)]
        g["bytes"] += nbytes
        if tensor.is_floating_point():
            total_params += tensor.numel()
            by_bits[str(tensor.element_size() * 8)] += tensor.numel()
            g["parameters"] += tensor.numel()
    for g in groups.values():
        g["bits_per_weight"] = 8 * g["bytes"] / g["parameters"] if g["parameters"] else None
    disk = Path(weights_file).stat().st_size if weights_file else None
    if total_params == 0:
        raise MeasurementError("storage: the model has no parameters")
    return StorageReport(total_params, dict(by_bits), total_bytes, 8 * total_bytes / total_params, dict(groups), disk)


def _persistent(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf not in getattr(owner, "_non_persistent_buffers_set", set())


# --- latency ----------------------------------------------------------------------------------
@dataclass
class LatencyReport:
    prompt_tokens: int
    decode_tokens: int
    prefill_ms: float  # median over repeats
    decode_ms_per_token_median: float
    decode_ms_per_token_p90: float
    tokens_per_second: float
    repeats: int
    environment: dict = field(default_factory=dict)
    # Every decode step in ms, repeat by repeat: in a side-by-side run, step i of every model was
    # taken at the same point of the measurement, so ratios of them pair up (brecq.timing).
    decode_ms_samples: list = field(default_factory=list)
    # How busy the machine was meanwhile (brecq.measurement.timing.Disturbance), for the whole side-by-side run.
    load: dict = field(default_factory=dict)


# transformers 5 renamed past_key_values to cache (the old name still works, with a warning).
def _cache_of(output):
    """The KV cache a forward returned (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3, warmup: int = 1,
            seed: int = 0) -> LatencyReport:
    """Prefill time of a ``prompt_tokens`` prompt and per-token decode time with the KV cache."""
    return paired_latency({"model": model}, prompt_tokens, decode_tokens, repeats, warmup, seed)["model"]


class TransformersDecode:
    """A model decoding through its own transformers forward with a KV cache (the default of
    :func:`paired_latency` for a plain model)."""

    path = "transformers"

    def __init__(self, model):
        self.model = model
        self._keyword, self._last_logits = _cache_keyword(model), _last_logits_only(model)

    def prefill(self, ids: torch.Tensor) -> None:
        out = self.model(ids, use_cache=True, **self._last_logits)
        self._cache, self._token = _cache_of(out), out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        out = self.model(self._token, use_cache=True, **{self._keyword: self._cache})
        self._cache, self._token = _cache_of(out), out.logits[:, -1:].argmax(-1)

    def release(self) -> None:
        self._cache = None


class RuntimeDecode:
    """The same protocol through brecq's C++ decoder (brecq.runtime.CpuDecoder): the prompt is
    prefilled by transformers and handed over, as ``brecq generate`` does, then one call a token."""

    path = "brecq C++ runtime"

    def __init__(self, model, decoder=None):
        from ..runtime import CpuDecoder

        self.model = model
        self.decoder = decoder if decoder is not None else CpuDecoder(model)

    def prefill(self, ids: torch.Tensor) -> None:
        from ..runtime.generate import prefill

        self._token = int(prefill(self.decoder, ids[0].cpu()).argmax())

    def step(self) -> None:
        self._token = self.decoder.forward_greedy([self._token])

    def release(self) -> None:
        self.decoder.reset()


def default_decode(model):
    """How brecq decodes ``model`` by default: the C++ runtime on the CPU where it supports the
    model, else transformers (the reason logged)."""
    from ..runtime import cpu_decoder_or_none

    decoder = cpu_decoder_or_none(model)
    return RuntimeDecode(model, decoder) if decoder is not None else TransformersDecode(model)


@torch.no_grad()
def paired_latency(models, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3, warmup: int = 1,
                   seed: int = 0, max_seconds: float = 0.0, target_halfwidth: float = 0.05) -> dict:
    """:func:`latency` of several models (label -> model) measured side by side: each repeat runs
    every model's prefill, then every decode step of every model, in a fresh random order each time,
    so that the machine's drift over the measurement falls on all of them alike and their ratios
    hold. All models decode the same prompt. Returns label -> LatencyReport. A value may be a
    model (timed through transformers) or a decode path (:class:`TransformersDecode`,
    :class:`RuntimeDecode`, :func:`default_decode`); the report names the path.

    After ``repeats``, more repeats follow while the 95 % interval of any model's decode-time ratio
    to the first model is wider than ``target_halfwidth`` (relative, each side) and the run has
    taken less than ``max_seconds`` (0: no more). Each report carries its step samples and how busy
    the machine was (``load``)."""
    from .timing import Activity, disturbance, ratio_interval

    before = Activity.now()
    started = time.perf_counter()
    order = random.Random(seed)
    labels = list(models)
    state = {}
    for label, engine in models.items():
        if isinstance(engine, nn.Module):
            engine = TransformersDecode(engine)
        device = next(engine.model.parameters()).device
        vocab = engine.model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
        state[label] = {"engine": engine, "device": device, "ids": ids, "prefill": [], "steps": []}
    reference = labels[0]

    def interval_too_wide() -> bool:
        for label in labels:
            if label == reference or len(state[label]["steps"]) < 2:
                continue
            ratio, (lo, hi) = ratio_interval(state[reference]["steps"], state[label]["steps"])
            if max(hi / ratio - 1, 1 - lo / ratio) > target_halfwidth:
                return True
        return False

    run = 0
    while run < warmup + repeats or (time.perf_counter() - started < max_seconds and interval_too_wide()):
        order.shuffle(labels)
        for label in labels:
            st = state[label]
            _sync(st["device"])
            start = time.perf_counter()
            st["engine"].prefill(st["ids"])
            _sync(st["device"])
            if run >= warmup:
                st["prefill"].append(time.perf_counter() - start)
        for _ in range(decode_tokens):
            order.shuffle(labels)
            for label in labels:
                st = state[label]
                _sync(st["device"])
                start = time.perf_counter()
                st["engine"].step()
                _sync(st["device"])
                if run >= warmup:
                    st["steps"].append(time.perf_counter() - start)
        run += 1
    done = run - warmup
    medians = [statistics.median(state[reference]["steps"][r * decode_tokens:(r + 1) * decode_tokens])
               for r in range(done)]
    load = disturbance(before, Activity.now(), medians).to_dict()
    reports = {}
    for label, st in state.items():
        engine = st["engine"]
        reports[label] = _latency_report(f"latency of {label}", st["prefill"], st["steps"], prompt_tokens,
                                         decode_tokens, done, engine.model)
        reports[label].environment["decode_path"] = engine.path
        reports[label].decode_ms_samples = [1e3 * t for t in st["steps"]]
        reports[label].load = load
        engine.release()  # the KV caches are no longer needed
    return reports


def _latency_report(what: str, prefill: list, steps: list, prompt_tokens: int, decode_tokens: int, repeats: int,
                    model) -> LatencyReport:
    """Medians (and the decode p90) in milliseconds of prefill and decode-step times in seconds;
    a missing or zero timing is an error, never a result."""
    if not steps or min(steps) <= 0 or not prefill or min(prefill) <= 0:
        raise MeasurementError(f"{what}: a timing came out zero or missing (prefill {prefill}, {len(steps)} steps)")
    median = statistics.median(steps)
    p90 = sorted(steps)[min(len(steps) - 1, int(0.9 * len(steps)))]
    parameter = next(model.parameters())
    measured_on = environment(parameter.device, parameter.dtype)
    measured_on["attention"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
    measured_on["rms_norm"] = "brecq_ext" if any(isinstance(m, RMSNorm) for m in model.modules()) else "model's own"
    return LatencyReport(prompt_tokens, decode_tokens, 1e3 * statistics.median(prefill), 1e3 * median, 1e3 * p90,
                         1.0 / median, repeats, measured_on)


def _last_logits_only(model) -> dict:
    """Forward arguments for logits of the last position only, as generate() asks for: a prefill
    then skips the lm_head over the rest of the prompt (at 512 tokens, a fifth of a W4/W6
    Qwen3-0.6B prefill on the CPU)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_keyword(model) -> str:
    """transformers 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy decoding with a static KV cache, one token per call, optionally replayed from a CUDA
    graph captured once (what serving stacks do to remove per-layer launch and Python costs).

    All inputs of a step live in fixed tensors (``token`` int64 [1, 1], ``position`` int64 [1]) and
    the logits of the step land in one fixed tensor, so the captured graph is valid for every step.
    ``compile_backend`` (e.g. "inductor") compiles the decode step with torch.compile first, which
    fuses the model's element-wise and normalisation kernels; the prefill stays eager.
    """

    def __init__(self, model, max_tokens: int, use_graph: bool, compile_backend: str | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        if use_graph and self.device.type != "cuda":
            raise MeasurementError("StaticDecoder: CUDA graphs need the model on a CUDA device")
        self.cache = StaticCache(config=model.config, max_cache_len=max_tokens)
        self.keyword = _cache_keyword(model)
        self.last_logits = _last_logits_only(model)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.use_graph = use_graph
        self.graph = None
        self.logits = None
        self._step_forward = (self._forward if compile_backend is None else
                              torch.compile(self._forward, backend=compile_backend, dynamic=False))

    def _forward(self, ids, positions):
        return self.model(ids, use_cache=True, cache_position=positions, **{self.keyword: self.cache},
                          **self.last_logits).logits

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Starts a new sequence from ids int64 [1, T]; returns the next token int64 [1, 1]."""
        if self.use_graph and self.graph is None:
            # The first prefill allocates the cache tensors; capture the step graph on them, then
            # start over: reset() zeroes the cache in place, so the graph's addresses stay valid.
            self._prefill(ids)
            self._capture()
        return self._prefill(ids)

    def _prefill(self, ids):
        self.cache.reset()
        logits = self._forward(ids, torch.arange(ids.shape[1], device=self.device))
        self.position.fill_(ids.shape[1])
        return logits[:, -1:].argmax(-1)

    def _capture(self) -> None:
        # Warm-up on a side stream (capture needs it), then capture one decode step. Both advance
        # the cache; the caller resets it afterwards.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # with compile_backend, the first call compiles
                self._step_forward(self.token, self.position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_forward(self.token, self.position)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feeds ``token`` int64 [1, 1] at the current position; returns the next token."""
        self.token.copy_(token)
        if self.use_graph:
            if self.graph is None:
                raise MeasurementError("StaticDecoder.step: call prefill first")
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step_forward(self.token, self.position)
        self.position.add_(1)
        return logits[:, -1:].argmax(-1)


@torch.no_grad()
def static_decode_latency(model, prompt_tokens: int = 128, decode_tokens: int = 32, use_graph: bool = True,
                          repeats: int = 3, seed: int = 0, compile_backend: str | None = None) -> LatencyReport:
    """Per-token decode time with a static KV cache (and, with ``use_graph``, CUDA graph replay;
    with ``compile_backend``, a torch.compile'd step); the prefill is timed once per repeat, as in
    :func:`latency`."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    decoder = StaticDecoder(model, prompt_tokens + decode_tokens + 4, use_graph, compile_backend)
    prefill, steps = [], []
    for run in range(repeats + 1):  # run 0 captures the graph and warms up
        _sync(device)
        start = time.perf_counter()
        token = decoder.prefill(ids)
        _sync(device)
        prefill_time = time.perf_counter() - start
        for _ in range(decode_tokens):
            _sync(device)
            start = time.perf_counter()
            token = decoder.step(token)
            _sync(device)
            if run > 0:
                steps.append(time.perf_counter() - start)
        if run > 0:
            prefill.append(prefill_time)
    return _latency_report("static_decode_latency", prefill, steps, prompt_tokens, decode_tokens, repeats, model)


# --- memory -------------------------------------------------------------------------------------
@torch.no_grad()
def cuda_memory(model, prompt_tokens: int = 128, decode_tokens: int = 32) -> dict:
    """Peak allocated/reserved CUDA memory during a forward pass and during generation, each after
    a reset (MiB); plus the model's own allocation before the workload."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise MeasurementError("cuda_memory: the model is not on a CUDA device")
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, prompt_tokens), device=device)
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(ids, use_cache=False)
    torch.cuda.synchronize(device)
    forward = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    torch.cuda.reset_peak_memory_stats(device)
    model.generate(ids, max_new_tokens=decode_tokens, do_sample=False, min_new_tokens=decode_tokens)
    torch.cuda.synchronize(device)
    generation = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    mib = 2.0 ** 20
    return {"model_allocated_mib": resident / mib, "forward_peak_allocated_mib": forward[0] / mib,
            "forward_peak_reserved_mib": forward[1] / mib, "generation_peak_allocated_mib": generation[0] / mib,
            "generation_peak_reserved_mib": generation[1] / mib}


_RSS_SCRIPT = """
import json, sys, torch
from brecq.io import load_model_any
from brecq.measurement.measure import peak_rss_mib
baseline = peak_rss_mib()
model, _ = load_model_any(sys.argv[1])
loaded = peak_rss_mib()
with torch.no_grad():
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, int(sys.argv[2])))
    model.generate(ids, max_new_tokens=int(sys.argv[3]), min_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps({"baseline_mib": baseline, "after_load_mib": loaded, "peak_mib": peak_rss_mib()}))
"""


def cpu_peak_rss(model_path: str | Path, prompt_tokens: int = 128, decode_tokens: int = 32) -> dict:
    """Peak resident memory (MiB) of a fresh process that loads the model and generates; the
    process's baseline (Python, torch, transformers imported) is reported beside it."""
    import tempfile

    # A neutral working directory: the child must import the installed package, not a source tree.
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model_path), str(prompt_tokens), str(decode_tokens)],
                          capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise MeasurementError(f"cpu_peak_rss: measurement process failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["model_mib"] = result["peak_mib"] - result["baseline_mib"]
    return result


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, which starts afresh at exec.
    (``getrusage``'s ru_maxrss does not: a child started from a large process reports its parent's
    peak until it exceeds it, so it cannot measure a small child.) ru_maxrss where there is no
    /proc."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float | None:
    """This process's resident memory now, in MiB (VmRSS), or None where there is no /proc."""
    return _status_mib("VmRSS")


def as_dict(obj) -> dict:
    return asdict(obj)
