"""Turn a pytest-benchmark JSON of bench/test_bench_matmul.py or bench/test_bench_attention.py into
the markdown tables of bench/README.md:  python bench/summarize.py bench/results/cpu.json"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = dict(b["extra_info"])
        info["median_s"] = b["stats"]["median"]
        rows.append(info)
    return data, rows


def attention_table(data, rows) -> str:
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["dtype"], r["kv_len"])][r["kind"]] = r
    machine = data.get("machine_info", {})
    first = rows[0]
    out = [(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
            f"threads {first['threads']}, torch {first.get('torch', '?')}; medians of pytest-benchmark rounds. "
            "One query token, 16 query heads on 8 key/value heads of 128, caches of 28 layers in turn. "
            "GB/s counts the cache's keys and values."), "",
           "| dtype | cached tokens | cache MiB per layer | sdpa us | brecq us | brecq GB/s | sdpa / brecq |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for (dtype, kv_len), kinds in sorted(by_case.items()):
        sdpa, brecq = kinds["attention_sdpa"], kinds["attention_brecq"]
        out.append(f"| {dtype} | {kv_len} | {brecq['cache_bytes'] / 2**20:.2f} | {sdpa['median_s'] * 1e6:.1f} | "
                   f"{brecq['median_s'] * 1e6:.1f} | {brecq['cache_bytes'] / brecq['median_s'] / 1e9:.1f} | "
                   f"{sdpa['median_s'] / brecq['median_s']:.2f}x |")
    return "\n".join(out)


def main(path: str) -> str:
    data, rows = load(path)
    if rows and all(r["kind"].startswith("attention_") for r in rows):
        return attention_table(data, rows)
    reads = {r["kind"]: r["weight_bytes"] / r["median_s"] / 1e9 for r in rows if r["kind"].startswith("read_bandwidth")}
    read_gbs = max(reads.values()) if reads else None  # the faster of torch's pages and huge pages
    read_mib = next((r["weight_bytes"] >> 20 for r in rows if r["kind"].startswith("read_bandwidth")), 0)
    cases = defaultdict(dict)
    for r in rows:
        if not r["kind"].startswith("read_bandwidth"):
            cases[(r["shape"], r["in_features"], r["out_features"], r["rows"])][r["kind"]] = r
    machine = data.get("machine_info", {})
    any_row = next(iter(next(iter(cases.values())).values()))
    out = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
           f"threads {any_row['threads']}, kernels {any_row.get('isa', '?')}, torch {any_row.get('torch', '?')}; "
           f"medians of pytest-benchmark rounds."]
    if read_gbs:
        pages = {"read_bandwidth": "torch's pages", "read_bandwidth_huge_pages": "huge pages"}
        listing = ", ".join(f"{gbs:.1f} GB/s on {pages.get(kind, kind)}" for kind, gbs in reads.items())
        out.append(f"Measured read bandwidth (torch sum over {read_mib} MiB): {listing}; "
                   f"`% bw` is against **{read_gbs:.1f} GB/s**.")
    out += ["", "Times in microseconds. W4T/W6T are in the TILE16 layout that QuantLinear holds on AVX-512 "
            "CPUs, W4/W6 in the row-major layout (docs/FORMAT.md); packed weights sit in one huge-page region "
            "(brecq_ext.arena), dense ones where torch puts them. GB/s counts the bytes of the weights as "
            "stored (packed codes, scales and zeros); `% bw` is that rate over the measured read bandwidth; "
            "`x bf16` is dense bfloat16 time over packed time (higher is better), `x f32` likewise against dense "
            "float32.", "",
            "| shape (in->out) | rows | dense f32 | dense bf16 | W4T bf16 | W4T GB/s | W4T % bw | W4T x bf16 | "
            "W4 x bf16 | W6T bf16 | W6T GB/s | W6T x bf16 | W6 x bf16 | W4T x f32 | W4 x f32 | W6T x f32 | "
            "W6 x f32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (shape, k, n, m), kinds in cases.items():
        def t(kind):
            return kinds[kind]["median_s"] if kind in kinds else float("nan")

        def gbs(kind):
            return kinds[kind]["weight_bytes"] / t(kind) / 1e9 if kind in kinds else float("nan")

        pct = 100 * gbs("w4t_bf16") / read_gbs if read_gbs else float("nan")
        out.append(
            f"| {shape} ({k}->{n}) | {m} | {t('dense_f32') * 1e6:.0f} | {t('dense_bf16') * 1e6:.0f} | "
            f"{t('w4t_bf16') * 1e6:.0f} | {gbs('w4t_bf16'):.1f} | {pct:.0f} | {t('dense_bf16') / t('w4t_bf16'):.2f} | "
            f"{t('dense_bf16') / t('w4_bf16'):.2f} | "
            f"{t('w6t_bf16') * 1e6:.0f} | {gbs('w6t_bf16'):.1f} | {t('dense_bf16') / t('w6t_bf16'):.2f} | "
            f"{t('dense_bf16') / t('w6_bf16'):.2f} | "
            f"{t('dense_f32') / t('w4t_f32'):.2f} | {t('dense_f32') / t('w4_f32'):.2f} | "
            f"{t('dense_f32') / t('w6t_f32'):.2f} | {t('dense_f32') / t('w6_f32'):.2f} |")
    if any("w3_bf16" in kinds or "w3_f32" in kinds for kinds in cases.values()):
        out += ["", "Row-major 3-bit weights (one bit-stream decoder for 2, 3, 5 and 7 bits, docs/CPU.md):", "",
                "| shape (in->out) | rows | W3 bf16 | W3 GB/s | W3 x bf16 | W3 f32 | W3 x f32 | W6 bf16 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (shape, k, n, m), kinds in cases.items():
            if "w3_bf16" not in kinds and "w3_f32" not in kinds:
                continue

            def t(kind):
                return kinds[kind]["median_s"] if kind in kinds else float("nan")

            gbs = kinds["w3_bf16"]["weight_bytes"] / t("w3_bf16") / 1e9 if "w3_bf16" in kinds else float("nan")
            out.append(f"| {shape} ({k}->{n}) | {m} | {t('w3_bf16') * 1e6:.0f} | {gbs:.1f} | "
                       f"{t('dense_bf16') / t('w3_bf16'):.2f} | {t('w3_f32') * 1e6:.0f} | "
                       f"{t('dense_f32') / t('w3_f32'):.2f} | {t('w6_bf16') * 1e6:.0f} |")
    kernel_kinds = [kind for kind in ("w4t_bf16_kernel", "w4_bf16_kernel", "w6t_bf16_kernel", "w6_bf16_kernel",
                                      "w3_bf16_kernel")
                    if any(kind in kinds for kinds in cases.values())]
    kernel_rows = [(key, kinds) for key, kinds in cases.items() if any(kind in kinds for kind in kernel_kinds)]
    if kernel_rows:
        label = {"w4t_bf16_kernel": "W4T", "w4_bf16_kernel": "W4", "w6t_bf16_kernel": "W6T", "w6_bf16_kernel": "W6",
                 "w3_bf16_kernel": "W3"}
        header = " | ".join(f"{label[kind]} {col}" for kind in kernel_kinds for col in ("us", "GB/s", "% bw", "x bf16"))
        out += ["", "GEMV kernel alone (compiled function called on raw pointers: no op dispatch, no argument "
                "checks), 1 row, bfloat16 activations:", "",
                f"| shape (in->out) | {header} |", "|---|" + "---:|" * (4 * len(kernel_kinds))]
        for (shape, k, n, m), kinds in kernel_rows:
            cells = []
            for kind in kernel_kinds:
                if kind not in kinds:
                    cells += ["-"] * 4
                    continue
                t = kinds[kind]["median_s"]
                gbs = kinds[kind]["weight_bytes"] / t / 1e9
                cells += [f"{t * 1e6:.0f}", f"{gbs:.1f}", f"{100 * gbs / read_gbs:.0f}" if read_gbs else "-",
                          f"{kinds['dense_bf16']['median_s'] / t:.2f}"]
            out.append(f"| {shape} ({k}->{n}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu.json"))
