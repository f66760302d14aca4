"""Peak resident memory of quantization, streamed and in memory, on a model far larger than the peak.

    python bench/streamed_quantize.py [--preset 0.6b] [--methods rtn,gptq,brecq] [--iters 10]

Builds a seeded Qwen3-shaped model (Qwen3-0.6B's shapes by default: 28 blocks, full vocabulary,
2.4 GB in float32, the embeddings alone 0.6 GB; or ``--preset deep``: 160 smaller blocks, 2.5 GB),
saves it in float32 in 500 MB shards, then quantizes it
with the study recipe (W6 attention, W4 MLP, group 64) in a fresh process per run and records:
the process's peak resident memory (VmHWM), its resident memory before quantization began
(Python, torch and transformers imported, the architecture's code loaded), and the wall time.
The in-memory path (``streamed=False``) runs last, RTN only, for contrast. Results go to
bench/results/streamed_quantize.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from brecq.quantization.calibration import CalibrationSpec
from brecq.measurement.measure import peak_rss_mib, rss_mib
from brecq.quantization.quantize import quantize_pretrained
from brecq.quantization.recipe import Method, get_recipe
from brecq.quantization.reconstruct import ReconstructionConfig
from brecq.streaming.skeleton import skeleton_from_folder
folder, parquet, out, method, streamed, iters = sys.argv[1:7]
skeleton_from_folder(folder)  # the architecture's code, imported before the baseline
base = rss_mib()
started = time.perf_counter()
method = Method(method)
calibration = None if method is Method.RTN else CalibrationSpec(parquet, 16, 128, 0)
quantize_pretrained(folder, out, get_recipe("w4g64_mix_attn6", method), calibration,
                    reconstruction=ReconstructionConfig(iters=int(iters), batch_size=4),
                    streamed=streamed == "1", show_progress=False)
print(json.dumps({"base_mib": base, "peak_mib": peak_rss_mib(), "seconds": time.perf_counter() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0.6b", help="a qwen3_config preset, or 'deep': 160 blocks of hidden 512 "
                        "(2.5 GB float32; blocks of 16 MB, a quarter of 0.6b's)")
    parser.add_argument("--methods", default="rtn,gptq,brecq")
    parser.add_argument("--iters", type=int, default=10, help="BRECQ iterations a block (memory does not depend on it)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "streamed_quantize.json"))
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from brecq.models import build_model, byte_level_bpe_tokenizer, qwen3_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="brecq-streamed-"))
    folder = work / "fp"
    corpus = [f"Story {i}: a fox named {i % 13} found {i % 7} apples by the old mill." for i in range(2000)]
    if not (folder / "model.safetensors.index.json").exists():
        byte_level_bpe_tokenizer(corpus, 1000, folder)
        shapes = {} if args.preset != "deep" else dict(
            vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=160, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64)
        model = build_model(qwen3_config("0.6b" if args.preset == "deep" else args.preset, **shapes), seed=0)
        model.save_pretrained(str(folder), max_shard_size="500MB")
        del model
    full_bytes = sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))
    parquet = work / "calibration.parquet"
    pq.write_table(pa.table({"text": corpus}), parquet)

    runs = [(m, True) for m in args.methods.split(",")] + [("rtn", False)]
    results = []
    for method, streamed in runs:
        out = work / f"q_{method}_{int(streamed)}"
        shutil.rmtree(out, ignore_errors=True)  # a work folder left by an earlier run would be resumed, not measured
        load_before = os.getloadavg()
        done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(parquet), str(out), method,
                               str(int(streamed)), str(args.iters)], capture_output=True, text=True, cwd=work)
        if done.returncode != 0:
            raise SystemExit(f"{method} streamed={streamed} failed:\n{done.stderr[-3000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record.update(method=method, streamed=streamed, loadavg_before=load_before, loadavg_after=os.getloadavg(),
                      packed_mib=(out / "model.safetensors").stat().st_size / 2**20)
        results.append(record)
        print(json.dumps(record), flush=True)

    summary = {"preset": args.preset, "full_precision_float32_mib": full_bytes / 2**20,
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__},
               "command": "python bench/streamed_quantize.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "runs": results}
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfull-precision weights (float32, {len(list(folder.glob('model-*.safetensors')))} shards): "
          f"{full_bytes / 2**20:.0f} MiB\n")
    print("| method | streamed | peak RSS MiB | before quantizing MiB | growth MiB | seconds | packed file MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {'yes' if r['streamed'] else 'no (in memory)'} | {r['peak_mib']:.0f} | "
              f"{r['base_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} | {r['seconds']:.0f} | {r['packed_mib']:.0f} |")


if __name__ == "__main__":
    main()
