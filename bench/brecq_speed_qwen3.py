"""Time BRECQ on a Qwen3-0.6B-shaped model (built from its config, seeded random weights) on this
machine, and extrapolate to the default schedule and the full 28 blocks.

    python bench/brecq_speed_qwen3.py [--blocks 2] [--iters 8] [--samples 16] [--seq-len 512] [--device cpu]

Per block it measures the fixed part (parameter search, round-to-nearest and final evaluation
passes) and the time per optimisation iteration separately, from two runs with different iteration
counts, so that the extrapolation to ``ReconstructionConfig().iters`` iterations is linear in what
actually grows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from brecq.models import build_model, qwen3_config
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import get_recipe
from brecq.quantization.reconstruct import ReconstructionConfig


def run(blocks: int, iters: int, samples: int, seq_len: int, device: str) -> list[float]:
    model = build_model(qwen3_config("0.6b", num_hidden_layers=blocks), seed=0)
    ids = torch.randint(0, 151936, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    report = quantize(model, get_recipe("w4g64_mix_attn6"), ids, reconstruction=ReconstructionConfig(iters=iters),
                      device=device, show_progress=False)
    return [b.seconds for b in report.blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    short = run(args.blocks, args.iters, args.samples, args.seq_len, args.device)
    long = run(args.blocks, 2 * args.iters, args.samples, args.seq_len, args.device)
    per_iter = [(b - a) / args.iters for a, b in zip(short, long)]
    fixed = [a - p * args.iters for a, p in zip(short, per_iter)]
    default_iters = ReconstructionConfig().iters
    per_block = [f + p * default_iters for f, p in zip(fixed, per_iter)]
    result = {"device": args.device, "threads": torch.get_num_threads(), "samples": args.samples,
              "seq_len": args.seq_len, "batch_size": ReconstructionConfig().batch_size,
              "seconds_per_iteration": per_iter, "fixed_seconds_per_block": fixed,
              "default_iters": default_iters, "extrapolated_seconds_per_block": per_block,
              "extrapolated_hours_28_blocks": 28 * sum(per_block) / len(per_block) / 3600,
              "wall_seconds": time.perf_counter() - started}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
