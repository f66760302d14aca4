"""Wall time of evaluation and of BRECQ with 1 process and with N processes under torchrun.

    python bench/distributed.py [--processes 2] [--repeats 3] [--limit 300]

Three jobs, each run once per repeat as 1 process and as N processes (torchrun --standalone),
alternating, every run from scratch in a fresh folder:
  * ``eval``: ARC (log-likelihood) on stories260k from ../shared, ``--limit`` examples;
  * ``brecq-blocks``: BRECQ W4 of an 8-block seeded Qwen3 (hidden 256) with inputs from the
    full-precision model, so ranks take disjoint blocks;
  * ``brecq-batch``: the same with inputs from the quantized blocks, each step's batch split over
    the ranks and the gradients all-reduced.
One process runs with torch's default threads (one per core); torchrun gives each of its processes
OMP_NUM_THREADS=1. Medians and ranges of the wall time go to bench/results/distributed.json, with
the load average before and after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"

EVAL = textwrap.dedent("""
    import sys
    from brecq.distributed import init_from_environment
    from brecq.evaluation.runner import Task, evaluate
    from brecq.io import load_model_any
    init_from_environment("cpu")
    model, tokenizer = load_model_any(sys.argv[1])
    evaluate(model, tokenizer, Task.ARC, sys.argv[2], sys.argv[3], limit=int(sys.argv[4]), show_progress=False)
""")

BRECQ = textwrap.dedent("""
    import sys, torch
    from brecq.distributed import init_from_environment
    from brecq.models import build_model, qwen3_config
    from brecq.quantization.quantize import quantize
    from brecq.quantization.recipe import get_recipe
    from brecq.quantization.reconstruct import InputSource, ReconstructionConfig
    init_from_environment("cpu")
    model = build_model(qwen3_config("tiny", hidden_size=256, intermediate_size=768, num_hidden_layers=8), seed=0)
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    quantize(model, get_recipe("w4g64"), ids, work_dir=sys.argv[1], show_progress=False,
             reconstruction=ReconstructionConfig(iters=100, batch_size=8, input_source=InputSource(sys.argv[2])))
""")


def run(script: str, args: list[str], processes: int, cwd: Path) -> float:
    path = cwd / "job.py"
    path.write_text(script)
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"])
    started = time.perf_counter()
    done = subprocess.run([*launcher, str(path), *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "distributed.json"))
    args = parser.parse_args()
    model = SHARED / "models" / "stories260k"
    arc = SHARED / "data" / "test-ai2_arc.parquet"
    jobs = {"eval": lambda d: (EVAL, [str(model), str(arc), str(d / "out"), str(args.limit)]),
            "brecq-blocks": lambda d: (BRECQ, [str(d / "work"), "full_precision"]),
            "brecq-batch": lambda d: (BRECQ, [str(d / "work"), "quantized"])}
    times: dict = {job: {1: [], args.processes: []} for job in jobs}
    loads = []
    for repeat in range(args.repeats):
        for job, make in jobs.items():
            for processes in (1, args.processes):
                with tempfile.TemporaryDirectory() as tmp:
                    script, job_args = make(Path(tmp))
                    before = os.getloadavg()
                    seconds = run(script, job_args, processes, Path(tmp))
                    loads.append({"job": job, "processes": processes, "before": before, "after": os.getloadavg()})
                times[job][processes].append(seconds)
                print(f"repeat {repeat} {job} x{processes}: {seconds:.1f} s", flush=True)
    summary = {"command": "python bench/distributed.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "seconds": {j: {str(p): v for p, v in t.items()} for j, t in times.items()},
               "loadavg": loads}
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n| job | 1 process (s) | {args.processes} processes (s) | ratio |")
    print("|---|---:|---:|---:|")
    for job, t in times.items():
        one, many = statistics.median(t[1]), statistics.median(t[args.processes])
        print(f"| {job} | {one:.1f} ({min(t[1]):.1f}-{max(t[1]):.1f}) | {many:.1f} "
              f"({min(t[args.processes]):.1f}-{max(t[args.processes]):.1f}) | {many / one:.2f} |")


if __name__ == "__main__":
    main()
