"""Markdown tables from a gpu_bench.py JSON file (for bench/README.md):

    python bench/gpu_summary.py gpu.json
"""
from __future__ import annotations

import json
import sys


def auto_choice_table(data: dict, kernel_rows: list, sms: int = 132) -> None:
    """The per-kernel timings of the kernel that the CUDA module's automatic choice takes for each
    layer (brecq_ext._cuda.gemv_choice, for a GPU of `sms` multiprocessors: 132 on an H100 or H200)."""
    try:
        from brecq_ext import _cuda
    except ImportError:
        return
    names = {2: "mma8", 3: "mma16"}
    timed = set(kernel_rows[0]["w4_kernel_ms"]) if kernel_rows else set()
    if not {"mma8", "mma16t0", "mma16t2"} <= timed:
        return  # a file from before the tunings were timed one by one
    print(f"\nThe kernel the automatic choice takes ({sms} SMs), from the per-kernel timings above:\n")
    print("| layer | rows | bf16 us | W4 kernel | W4 us | W4 of copy | W4 vs bf16 | W6 kernel | W6 us | W6 of copy | "
          "W6 vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in kernel_rows:
        cells = []
        for bits in (4, 6):
            kernel, tuning = _cuda.gemv_choice(r["out"], r["in"], 64, bits, r["rows"], sms)
            name = names[kernel] + (f"t{tuning}" if kernel == 3 else "")
            ms = r[f"w{bits}_kernel_ms"][name]
            nbytes = r[f"w{bits}_gbs"] * r[f"w{bits}_ms"] * 1e6
            fraction = nbytes / (ms * 1e-3) / 1e9 / data["copy_bandwidth_gbs"]
            cells.append((name, ms, fraction, r["dense_bf16_ms"] / ms))
        (n4, ms4, f4, s4), (n6, ms6, f6, s6) = cells
        print(f"| {r['shape']} {r['in']}->{r['out']} | {r['rows']} | {r['dense_bf16_ms'] * 1e3:.1f} | {n4} | "
              f"{ms4 * 1e3:.1f} | {100 * f4:.0f}% | {s4:.2f}x | {n6} | {ms6 * 1e3:.1f} | {100 * f6:.0f}% | {s6:.2f}x |")


def main(path: str) -> None:
    data = json.load(open(path))
    env = data["environment"]
    print(f"{env.get('gpu')}, torch {env['torch']}, device-to-device copy {data['copy_bandwidth_gbs']:.0f} GB/s "
          "(read + write)\n")
    print("| layer | rows | bf16 us | W4 us | W4 GB/s | W4 of copy | W4 vs bf16 | W6 us | W6 GB/s | W6 vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in data.get("matmul", []):
        print(f"| {r['shape']} {r['in']}->{r['out']} | {r['rows']} | {r['dense_bf16_ms'] * 1e3:.1f} | "
              f"{r['w4_ms'] * 1e3:.1f} | {r['w4_gbs']:.0f} | {100 * r['w4_fraction_of_copy']:.0f}% | "
              f"{r['w4_speedup_vs_bf16']:.2f}x | {r['w6_ms'] * 1e3:.1f} | {r['w6_gbs']:.0f} | "
              f"{r['w6_speedup_vs_bf16']:.2f}x |")
    kernel_rows = [r for r in data.get("matmul", []) if "w4_kernel_ms" in r]
    if kernel_rows:
        names = list(kernel_rows[0]["w4_kernel_ms"])
        print("\nEach tensor-core GEMV kernel on its own (us per call; bf16 dense for reference):\n")
        print("| layer | rows | bf16 | " + " | ".join(f"W{b} {name}" for b in (4, 6) for name in names)
              + " | W4 best of copy |")
        print("|---|---|---|" + "---|" * (2 * len(names) + 1))
        for r in kernel_rows:
            cells = [f"{r[f'w{b}_kernel_ms'][name] * 1e3:.1f}" for b in (4, 6) for name in names]
            w4_bytes = r["w4_gbs"] * r["w4_ms"] * 1e6  # bytes one W4 call reads
            best = min(r["w4_kernel_ms"].values())
            fraction = w4_bytes / (best * 1e-3) / 1e9 / data["copy_bandwidth_gbs"]
            print(f"| {r['shape']} | {r['rows']} | {r['dense_bf16_ms'] * 1e3:.1f} | " + " | ".join(cells)
                  + f" | {100 * fraction:.0f}% |")
    auto_choice_table(data, kernel_rows)
    if "eager_call_us_gate_proj_1row" in data:
        print("\neager call, gate_proj, 1 row (us):", json.dumps(data["eager_call_us_gate_proj_1row"]))
    decode = data.get("decode", {})
    if "w4w6" in decode and "eager" in decode["w4w6"]:
        labels = [label for label, entry in decode.items() if label != "bf16" and isinstance(entry, dict)
                  and "eager" in entry]
        names = {"w4w6": "W4/W6", "w4w6_head4": "W4/W6 + W4 lm_head", "w4w6_fused": "W4/W6 fused",
                 "w4w6_head4_fused": "W4/W6 + W4 lm_head, fused"}
        print("\n| decode (Qwen3-0.6B shape, 128-token prompt) | bf16 ms/token | "
              + " | ".join(f"{names.get(label, label)} ms/token | speed-up" for label in labels) + " |")
        print("|---|---|" + "---|---|" * len(labels))
        for mode in ("eager", "cuda_graph"):
            if mode in decode["w4w6"]:
                a = decode["bf16"][mode]["decode_ms_per_token_median"]
                cells = [(decode[label][mode]["decode_ms_per_token_median"]) for label in labels if mode in decode[label]]
                print(f"| {mode} | {a:.2f} | " + " | ".join(f"{b:.2f} | {a / b:.2f}x" for b in cells) + " |")
        for label, profile in decode.get("gpu_kernel_time", {}).items():
            print(f"\nGPU kernel time per eager decode step, {label}: {profile['us_per_step_total']:.0f} us; largest:")
            for item in profile["top"][:6]:
                print(f"  {item['us_per_step']:8.1f} us  {item['kernel']}")
        if "eager_repeat" in decode["bf16"]:
            print(f"\nbf16 eager timed again after the quantized model: "
                  f"{decode['bf16']['eager_repeat']['decode_ms_per_token_median']:.2f} ms/token")
        compiled = data.get("decode_compiled", {})
        if "speedup" in compiled:
            print(f"\ntorch.compile (inductor) + CUDA graph: bf16 {compiled['bf16']['decode_ms_per_token_median']:.3f}, "
                  f"W4/W6 {compiled['w4w6']['decode_ms_per_token_median']:.3f} ms/token, {compiled['speedup']:.2f}x")
            for label, entry in compiled.items():
                if label not in ("bf16", "w4w6") and isinstance(entry, dict):
                    print(f"  {names.get(label, label)} {entry['decode_ms_per_token_median']:.3f} ms/token, "
                          f"{compiled['speedup_' + label]:.2f}x")
        print("\nweight bytes (MiB): " + ", ".join(f"{label} {decode[label]['weight_bytes'] / 2**20:.0f}"
                                                   for label in ("bf16", *labels)))
    for name, error in data.get("errors", {}).items():
        print(f"\nsection {name} FAILED:\n{error[-1500:]}")


if __name__ == "__main__":
    main(sys.argv[1])
