"""Decode on the CPU through brecq's C++ runtime (brecq.runtime), against transformers on the same
models and against llama.cpp's own Q4_K_M / Q4_0 / Q8_0 files of the same weights, interleaved.

The model is Qwen3-0.6B-shaped (28 layers, full 151,936-row vocabulary) with seeded random weights in
bfloat16 and a byte-level BPE tokenizer trained on ../shared/data (random weights show speed, not
quality). brecq variants, quantized by round to nearest (the method changes neither bytes nor speed):

* ``w4w6_head8``: the study recipe, W6 attention, W4 MLP, group 64, 8-bit lm_head (preset
  w4g64_mix_attn6_head8);
* ``w4w6_head4``: the same with a 4-bit lm_head (about Q4_K_M's bytes per token, whose output is Q6_K);
* ``w4``: W4 everywhere, lm_head included.

Engines: ``runtime`` (brecq.runtime.CpuDecoder: one C++ call per token, prompt prefilled by
transformers and handed over, as ``brecq generate`` does; the model prepared as the study prepares it,
brecq_sdpa attention and fused RMSNorm, so that its prefill is the study's), ``transformers`` (today's study path: the
same quantized model through transformers with brecq_sdpa attention and fused RMSNorm), ``bf16``
(the unquantized model through transformers), and llama.cpp (llama-cpp-python, built from its sdist,
same thread count) on GGUF files that its own quantizer made from brecq's full-precision GGUF export.

For each depth, every engine prefills the same random prompt once, then decode steps of all engines
run interleaved in a fresh random order each round. Prefill speed at 128 and 512 tokens is timed
separately, interleaved, 3 times. The floor of a runtime step is the time a plain read of the bytes
it reads takes, timed right after that step: its weights where they are (the model's arena on 2 MiB
pages) and a buffer as large as the KV cache at its position (2 MiB pages too); the host's read rate
drifts (35-64 GB/s within one run here, within seconds), so each step is compared with a read of the
same seconds, and the table gives the median of those ratios (and, where the reads fell into two rates,
the ratios of the steps beside slower and beside faster reads apart). The runtime's own profile splits its
step into weight streaming (linear layers and lm_head) and the rest. A table of ratios gives how many times faster each runtime variant decodes than each
llama.cpp row, depth by depth.

``--llama-bench [LABEL=]PATH`` (repeatable: one per build, e.g. ``llama-bench-amx=...``) adds llama.cpp's
own benchmark tool (``llama-bench``, built from the llama.cpp tree vendored in llama-cpp-python's sdist,
see bench/README.md and bench/llama_cpp_source.sh) on the same files: within each repeat
at each depth, one ``llama-bench -p 0 -n TOKENS -d DEPTH -r 1`` per file runs between the rounds of
the in-process engines, in random order; its row is the median of those runs' mean ms per token
(it reports no per-token times), where the in-process rows are medians of single steps.

    python bench/cpu_runtime.py [--depths 0 128 512 2048] [--tokens 16] [--repeats 3] [--layers 28]
                                [--no-llama-cpp] [--llama-bench [LABEL=]PATH ...] [--json bench/results/cpu_runtime.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("brecq.bench")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA_TYPES = {"Q4_K_M": 15, "Q4_0": 2, "Q8_0": 7}  # llama.h LLAMA_FTYPE_MOSTLY_*


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class PlainRead:
    """Plain reads (the max of int32 views, on torch's threads) to put beside a step: of a model's own
    weights where they live (its ``brecq_ext`` arena on 2 MiB pages), and of a buffer on 2 MiB pages
    standing in for the KV cache (the runtime's own is not reachable from Python). The weights are
    read where they are because on this VM the same bytes at other addresses can read at another
    rate (one brecq_gemv_bench process's pool read 2x slower in one half than the other)."""

    def __init__(self, nbytes: int):
        from brecq_ext.arena import place_tensors

        self.arena, _ = place_tensors([torch.ones(nbytes // 4, dtype=torch.int32)], huge_pages=True)

    @staticmethod
    def region_seconds(region: torch.Tensor, nbytes: int | None = None) -> float:
        """Seconds one read of ``region``'s first ``nbytes`` (all of it by default) takes."""
        count = (region.numel() if nbytes is None else nbytes) // 4
        view = region[: 4 * count].view(torch.int32)
        started = time.perf_counter()
        view.max()
        return time.perf_counter() - started

    def seconds(self, nbytes: int) -> float:
        """Seconds one read of the first ``nbytes`` of the stand-in buffer takes."""
        return self.region_seconds(self.arena.region, nbytes)

    def gbs(self, repeats: int = 3) -> float:
        """The rate the whole stand-in buffer is read at, median of ``repeats`` reads after one unmeasured."""
        nbytes = self.arena.nbytes
        self.seconds(nbytes)
        return nbytes / statistics.median(self.seconds(nbytes) for _ in range(repeats)) / 1e9


def recipes():
    from brecq.quantization.recipe import ATTENTION, MLP, Method, Recipe, get_recipe

    from brecq_ext.quant_linear import LayerRule

    return {"w4w6_head8": get_recipe("w4g64_mix_attn6_head8", Method.RTN),
            "w4w6_head4": Recipe("w4w6_head4", (LayerRule(ATTENTION, 6, 64), LayerRule(MLP, 4, 64),
                                                LayerRule(r"^lm_head$", 4, 64)), Method.RTN),
            "w4": Recipe("w4_head4", (LayerRule(ATTENTION, 4, 64), LayerRule(MLP, 4, 64),
                                      LayerRule(r"^lm_head$", 4, 64)), Method.RTN)}


def build(workdir: Path, layers: int) -> tuple[Path, dict]:
    from brecq import quantize_pretrained
    from brecq.models import build_model, byte_level_bpe_tokenizer, qwen3_config

    text = (SHARED / "tinystories_val_head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    fp = workdir / "fp"
    tokenizer = byte_level_bpe_tokenizer(stories, 1024, fp)
    config = qwen3_config("0.6b", num_hidden_layers=layers, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, max_position_embeddings=4096)
    build_model(config, seed=0).to(torch.bfloat16).save_pretrained(str(fp))
    quantized = {}
    for label, recipe in recipes().items():
        started = time.perf_counter()
        quantize_pretrained(str(fp), str(workdir / label), recipe, show_progress=False)
        log.info("%s quantized in %.0f s", label, time.perf_counter() - started)
        quantized[label] = workdir / label
    return fp, quantized


def llama_files(workdir: Path, fp: Path, quantize_binary: str | None = None) -> dict:
    from brecq.export import export_gguf_full_precision
    from brecq.export.llamacpp import llama_quantize

    source = workdir / "fp.gguf"
    export_gguf_full_precision(fp, source)
    files = {}
    for name, ftype in LLAMA_TYPES.items():
        out = workdir / f"{name}.gguf"
        started = time.perf_counter()
        llama_quantize(source, out, ftype, torch.get_num_threads(), binary=quantize_binary)
        log.info("llama.cpp %s: %.0f MB in %.0f s", name, out.stat().st_size / 1e6, time.perf_counter() - started)
        files[name] = out
    return files


class LlamaCppEngine:
    def __init__(self, path: Path, n_ctx: int, threads: int):
        from brecq.export.llamacpp import open_llama

        self.llm = open_llama(path, n_ctx=n_ctx, n_threads=threads, logits_all=False)

    def prefill(self, ids: torch.Tensor) -> None:  # the protocol of brecq.measurement.measure.RuntimeDecode
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        self.token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())

    def step(self) -> None:
        self.llm.eval([self.token])
        self.token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())


class LlamaBenchFailed(RuntimeError):
    """A llama-bench run that exited with an error or a signal (its row records it, the run goes on)."""


def llama_bench_ms(binary: str, path: Path, depth: int, tokens: int, threads: int) -> float:
    """One ``llama-bench`` run of ``tokens`` decode steps after ``depth`` cached tokens: mean ms/token."""
    import signal
    import subprocess

    command = [binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-d", str(depth), "-r", "1",
               "-t", str(threads), "-o", "json"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        how = (signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit code {done.returncode}")
        raise LlamaBenchFailed(f"{how} at depth {depth}: {done.stderr.strip()[-300:]}")
    (run,) = json.loads(done.stdout)
    return run["avg_ns"] / 1e6 / tokens


def weight_bytes(model) -> int:
    """Bytes a decode step reads for weights: every linear layer's stored weights (packed codes,
    scales and zeros, or dense), biases, norms; the embedding row is negligible."""
    from brecq_ext.quant_linear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (module.packed, module.scale, module.zero))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def kv_bytes(config, depth: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * depth * 2  # bfloat16


def summarise_values(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p10": ordered[len(ordered) // 10],
            "p90": ordered[(9 * len(ordered)) // 10], "n": len(ordered)}


def by_read_rate(steps: list[tuple[float, float]]) -> dict:
    """x floor of the steps paired with slow and with fast reads, apart.

    Some hosts read at two rates (this VM: about 35 and 60 GB/s, switching within seconds), and a
    step's ratio to its floor differs between them, so one median mixes them in whatever proportion
    the run met. Split at the geometric mean of the reads' p10 and p90 when those differ by 30 % or
    more; otherwise there is one regime and nothing to split.
    """
    if not steps:
        return {}
    reads = summarise_values([read for read, _ in steps])
    if reads["p90"] < 1.3 * reads["p10"]:
        return {}
    split = (reads["p10"] * reads["p90"]) ** 0.5
    slow = [ratio for read, ratio in steps if read < split]
    fast = [ratio for read, ratio in steps if read >= split]
    return {"split_gbs": split, "slow": summarise_values(slow) if slow else {},
            "fast": summarise_values(fast) if fast else {}}


def summarise(samples: list[float], failure: str | None = None) -> dict:
    """Step times in ms: median_ms, p10_ms, p90_ms and n, or the failure."""
    if not samples:
        return {"failed": failure or "no samples"}
    return {key if key == "n" else f"{key}_ms": value for key, value in summarise_values(samples).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 128, 512, 2048])
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512], help="prompt lengths of the prefill timing")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even where it is installed")
    parser.add_argument("--llama-bench", action="append", default=[], metavar="[LABEL=]PATH",
                        help="a llama-bench binary to time the llama.cpp files with too (repeatable; rows are "
                             "named LABEL, default llama-bench)")
    parser.add_argument("--llama-quantize", default=None, metavar="PATH",
                        help="llama.cpp's llama-quantize binary, to make the files without llama-cpp-python (default: "
                             "the one beside the first --llama-bench, where llama-cpp-python is not installed)")
    parser.add_argument("--no-bf16", action="store_true", help="leave the unquantized transformers model out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.repeats < 1 or args.tokens < 1:
        parser.error(f"--repeats and --tokens must be at least 1, got {args.repeats} and {args.tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import importlib.util

    import brecq
    from brecq.attention import use_decode_attention
    from brecq.io import atomic_write_text
    from brecq.measurement.measure import RuntimeDecode, TransformersDecode, environment

    from brecq_ext import fuse_rms_norms_

    benches = {}
    for spec in args.llama_bench:
        label, _, path = spec.rpartition("=")
        label = label or "llama-bench"
        if label in benches or " " in label:
            parser.error(f"--llama-bench: label {label!r} is used twice or has a space")
        if not Path(path).is_file():
            parser.error(f"--llama-bench: {path} is not a file")
        benches[label] = path
    torch.set_num_threads(args.threads)
    has_llama = importlib.util.find_spec("llama_cpp") is not None and not args.no_llama_cpp
    quantize_binary = args.llama_quantize
    if quantize_binary is None and benches and not has_llama:
        beside = Path(next(iter(benches.values()))).with_name("llama-quantize")
        quantize_binary = str(beside) if beside.is_file() else None
    if quantize_binary is not None and not Path(quantize_binary).is_file():
        parser.error(f"--llama-quantize: {quantize_binary} is not a file")
    if not has_llama and not args.no_llama_cpp:
        log.warning("llama-cpp-python is not installed: its rows are left out (pip install '.[llamacpp]')%s",
                    "" if quantize_binary else ", and so are llama-bench's (no llama-quantize to make its files)")
    result = {"layers": args.layers, "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
              "environment": environment(torch.device("cpu"), torch.bfloat16), "loadavg_before": loadavg(),
              "depths": {}, "prefill": {}, "bytes_per_token": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        workdir = Path(tmp)
        fp, quantized = build(workdir, args.layers)
        engines, models = {}, {}
        for label, path in quantized.items():
            models[label] = brecq.load_quantized(path).to(torch.bfloat16).eval()
            # Prepared as the study prepares the models it times (study/runner.py: brecq_sdpa and fused
            # norms), so that the runtime's prefill, which transformers runs, is the study's too.
            use_decode_attention(models[label])
            fuse_rms_norms_(models[label])
            engines[f"{label} runtime"] = RuntimeDecode(models[label])
            result["bytes_per_token"][label] = weight_bytes(models[label])
        engines["w4w6_head8 transformers"] = TransformersDecode(copy.deepcopy(models["w4w6_head8"]))
        if not args.no_bf16:
            from transformers import AutoModelForCausalLM

            dense = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.bfloat16).eval()
            engines["bf16 transformers"] = TransformersDecode(dense)
            result["bytes_per_token"]["bf16"] = weight_bytes(dense)
        files = {}
        if has_llama or (benches and quantize_binary and not args.no_llama_cpp):
            files = llama_files(workdir, fp, None if has_llama else quantize_binary)
            for name, path in files.items():
                result["bytes_per_token"][f"llama.cpp {name} (file)"] = path.stat().st_size
            if benches:
                result["llama_bench"] = benches
        if has_llama:
            import llama_cpp

            result["llama_cpp_python"] = llama_cpp.__version__
            n_ctx = max(args.depths + args.prefill) + args.repeats * args.tokens + 16
            for name, path in files.items():
                engines[f"llama.cpp {name}"] = LlamaCppEngine(path, n_ctx, args.threads)
        config = models["w4w6_head8"].config
        reader = PlainRead(max(512 << 20, kv_bytes(config, max(args.depths) + args.repeats * args.tokens + 1)))
        from brecq_ext.arena import gather_quantized_weights

        weights = {}  # each runtime variant's arena (load_quantized made it; the call returns that one)
        for label in quantized:
            arena = gather_quantized_weights(models[label])
            if arena is None or abs(arena.nbytes - result["bytes_per_token"][label]) > 0.01 * arena.nbytes:
                raise SystemExit(f"{label}: its weights are not in one arena of {result['bytes_per_token'][label]} bytes")
            weights[label] = arena.region
        order = random.Random(0)
        labels = list(engines)

        # Prefill speed, interleaved, 3 times each.
        for length in args.prefill:
            ids = torch.randint(3, 1024, (1, length), generator=torch.Generator().manual_seed(length))
            times = {label: [] for label in labels}
            for _ in range(3):
                for label in order.sample(labels, len(labels)):
                    started = time.perf_counter()
                    engines[label].prefill(ids)
                    times[label].append(time.perf_counter() - started)
            result["prefill"][str(length)] = {label: {"tokens_per_s": length / statistics.median(t),
                                                      "ms_range": [1e3 * min(t), 1e3 * max(t)]}
                                              for label, t in times.items()}
            log.info("prefill %d done", length)

        # Decode at each depth.
        for depth in args.depths:
            ids = torch.randint(3, 1024, (1, max(depth, 1)), generator=torch.Generator().manual_seed(depth))
            for label in labels:
                engines[label].prefill(ids)
            samples = {label: [] for label in labels}
            profiles = {}
            for label in labels:
                if label.endswith("runtime"):
                    engines[label].decoder._runtime.reset_profile()
                    engines[label].decoder._runtime.set_profiling(True)
            units = ["in-process"] + [f"{bench} {name}" for bench in benches for name in files]
            failures = {}
            for label in units[1:]:
                samples[label] = []
            bandwidths = []
            # Each runtime step's floor: a plain read of the bytes that step reads (its weights where
            # they are, and as many bytes as the KV cache at its position), timed right after it. The
            # host's read rate drifts (35-64 GB/s within one run here, changing within seconds), so a
            # rate read once a round can belong to another regime than the steps it is compared with.
            paired = {label: [] for label in labels if label.endswith("runtime")}
            paired_reads = []
            paired_steps = {label: [] for label in paired}  # (read GB/s, x floor) of each step
            for _ in range(args.repeats):
                bandwidths.append(reader.gbs())
                for unit in order.sample(units, len(units)):
                    if unit != "in-process":
                        if unit in failures:
                            continue
                        path = files[unit.split()[-1]]
                        bench = unit.rsplit(" ", 1)[0]
                        try:
                            samples[unit].append(llama_bench_ms(benches[bench], path, depth, args.tokens,
                                                                args.threads))
                        except LlamaBenchFailed as error:
                            log.warning("%s: %s", unit, error)
                            failures[unit] = str(error).split(":")[0]
                        continue
                    for _ in range(args.tokens):
                        for label in order.sample(labels, len(labels)):
                            started = time.perf_counter()
                            engines[label].step()
                            step_ms = 1e3 * (time.perf_counter() - started)
                            samples[label].append(step_ms)
                            if label in paired:
                                variant = label.split()[0]
                                kv = kv_bytes(config, depth + len(samples[label]))
                                read_s = reader.region_seconds(weights[variant]) + (reader.seconds(kv) if kv else 0.0)
                                read_gbs = (weights[variant].numel() + kv) / read_s / 1e9
                                paired[label].append(step_ms / (1e3 * read_s))
                                paired_reads.append(read_gbs)
                                paired_steps[label].append((read_gbs, step_ms / (1e3 * read_s)))
            for label in labels:
                if label.endswith("runtime"):
                    runtime = engines[label].decoder._runtime
                    runtime.set_profiling(False)
                    seconds = runtime.profile()
                    steps = len(samples[label])
                    profiles[label] = {"linear_ms": 1e3 * seconds[0] / steps, "lm_head_ms": 1e3 * seconds[1] / steps,
                                       "attention_ms": 1e3 * seconds[2] / steps, "other_ms": 1e3 * seconds[3] / steps}
            result["depths"][str(depth)] = {"decode": {label: summarise(s, failures.get(label))
                                                       for label, s in samples.items()},
                                            "runtime_profile": profiles, "kv_bytes": kv_bytes(config, depth),
                                            "bandwidth_gbs": bandwidths,
                                            "paired_read_gbs": summarise_values(paired_reads),
                                            "x_floor": {label: summarise_values(r) for label, r in paired.items()},
                                            "x_floor_by_read": {label: by_read_rate(steps)
                                                                for label, steps in paired_steps.items()},
                                            "x_floor_steps": paired_steps}
            log.info("depth %d done", depth)
    result["loadavg_after"] = loadavg()
    report(result, args)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))


def report(result: dict, args) -> None:
    reads = [gbs for depth in result["depths"].values() for gbs in depth["bandwidth_gbs"]]
    print(f"Qwen3-0.6B shape, {args.layers} layers, {args.threads} threads; read bandwidth once a round "
          f"{statistics.median(reads):.1f} GB/s (range {min(reads):.1f}-{max(reads):.1f}); loadavg "
          f"{result['loadavg_before']} -> {result['loadavg_after']}\n")
    depths = list(result["depths"])
    labels = list(next(iter(result["depths"].values()))["decode"])
    print("Decode ms/token, median (p10-p90):\n")
    print("| engine | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|" + "---:|" * len(depths))
    for label in labels:
        cells = []
        for d in depths:
            s = result["depths"][d]["decode"][label]
            cells.append(f"failed ({s['failed']})" if "failed" in s else
                         f"{s['median_ms']:.1f} ({s['p10_ms']:.1f}-{s['p90_ms']:.1f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    llama_rows = [label for label in labels if label.startswith("llama")]
    runtime_rows = [label for label in labels if label.endswith("runtime")]
    if llama_rows and runtime_rows:
        print("\nHow many times faster the runtime decodes than each llama.cpp row (ratio of medians):\n")
        print("| runtime | against | " + " | ".join(f"depth {d}" for d in depths) + " |")
        print("|---|---|" + "---:|" * len(depths))
        for label in runtime_rows:
            for other in llama_rows:
                cells = []
                for d in depths:
                    ours, theirs = result["depths"][d]["decode"][label], result["depths"][d]["decode"][other]
                    cells.append("-" if "failed" in theirs or "failed" in ours
                                 else f"{theirs['median_ms'] / ours['median_ms']:.2f}")
                print(f"| {label.split()[0]} | {other} | " + " | ".join(cells) + " |")
    print("\nbrecq runtime against its floor: each step beside a plain read of the bytes it reads (its weights "
          "where they are, and a buffer the size of the KV cache at its position; 2 MiB pages), timed right after "
          "it; x floor is the median (p10-p90) of the steps' ratios, read GB/s the median of those reads:\n")
    print("| variant | depth | bytes/token (MB) | read GB/s | floor ms | measured ms | x floor (p10-p90) | not weight streaming |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        if not label.endswith("runtime"):
            continue
        variant = label.split()[0]
        for d in depths:
            at = result["depths"][d]
            nbytes = result["bytes_per_token"][variant] + at["kv_bytes"]
            read_gbs = at["paired_read_gbs"]["median"]
            ratio = at["x_floor"][label]
            profile = at["runtime_profile"][label]
            total = sum(profile.values())
            rest = (profile["attention_ms"] + profile["other_ms"]) / total if total else float("nan")
            print(f"| {variant} | {d} | {nbytes / 1e6:.0f} | {read_gbs:.1f} | {nbytes / (read_gbs * 1e9) * 1e3:.1f} | "
                  f"{at['decode'][label]['median_ms']:.1f} | {ratio['median']:.2f} ({ratio['p10']:.2f}-{ratio['p90']:.2f}) | "
                  f"{100 * rest:.0f} % |")
    split_rows = [(label, d, result["depths"][d]["x_floor_by_read"][label]) for label in labels
                  if label.endswith("runtime") for d in depths if result["depths"][d]["x_floor_by_read"].get(label)]
    if split_rows:
        print("\nThe same ratios apart by the rate of the read paired with each step (the host read at two rates):\n")
        print("| variant | depth | split at GB/s | x floor, slower reads (n) | x floor, faster reads (n) |")
        print("|---|---:|---:|---:|---:|")
        for label, d, split in split_rows:
            cells = [f"{split[side]['median']:.2f} ({split[side]['p10']:.2f}-{split[side]['p90']:.2f}, {split[side]['n']})"
                     if split[side].get("n") else "-" for side in ("slow", "fast")]
            print(f"| {label.split()[0]} | {d} | {split['split_gbs']:.0f} | " + " | ".join(cells) + " |")
    print("\nPrefill tokens/s (range of 3 in ms):\n")
    print("| engine | " + " | ".join(f"{p} tokens" for p in result["prefill"]) + " |")
    print("|---|" + "---:|" * len(result["prefill"]))
    for label in (label for label in labels if label in next(iter(result["prefill"].values()), {})):
        cells = [f"{r[label]['tokens_per_s']:.0f} ({r[label]['ms_range'][0]:.0f}-{r[label]['ms_range'][1]:.0f})"
                 for r in result["prefill"].values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nbytes per token (weights as stored; llama.cpp: file size):")
    for label, nbytes in result["bytes_per_token"].items():
        print(f"  {label}: {nbytes / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
