"""Analysis and report of a study: statistics first, then text derived from them by stated rules.

Rules (also printed in the report):
* A quantized variant is **better** / **worse** than its unquantized model on a metric when the 95 %
  interval of the paired difference excludes zero (Tango's score interval for per-example binary
  metrics, which keeps its width when few pairs disagree; a paired bootstrap for F1) and, for
  binary metrics, McNemar's exact test gives p < 0.05. When both sit at the metric's floor or
  ceiling on every example (e.g. exact match 0 for both) the comparison is **uninformative**;
  otherwise it is a **tie** (no significant difference).
* Relative changes are shown only when the unquantized value is at least 20 points.
* Memory and size are reported as reductions (positive = smaller); latency as the ratio of
  quantized to unquantized decode time per token (below 1 = faster), with p90, from a run that
  times all variants of a model side by side (decode steps interleaved in random order), so that
  the machine's drift does not enter the ratio.
* Conclusions and recommendations are derived from these verdicts and ratios, not written by hand.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..evaluation.runner import compare, read_records
from ..io import atomic_write_text
from .config import StudyConfig

log = logging.getLogger("brecq")

UNQUANTIZED = "unquantized"
TRANSFORMERS_SUFFIX = " (transformers)"  # as brecq.study.runner names them
PRIMARY = {"arc": [("acc", "correct", True), ("acc_norm", "acc_norm", True)],
           "arc_gen": [("acc", "correct", True)],
           "squad": [("exact_match", "correct", True), ("f1", "f1", False)]}
SIGNIFICANCE = 0.05
RELATIVE_MIN_BASE = 0.20
MIB = 2.0 ** 20


def pts(x: float) -> str:
    return f"{100 * x:.1f}"


def signed_pts(x: float) -> str:
    return f"{x:+.1f}"


def verdict(cmp: dict, binary: bool) -> str:
    if cmp.get("uninformative"):
        return "uninformative"
    lo, hi = cmp["ci95_points"]
    significant = (lo > 0 or hi < 0) and (not binary or cmp["mcnemar_p"] < SIGNIFICANCE)
    if not significant:
        return "tie"
    return "better" if cmp["difference_points"] > 0 else "worse"


def analyse(results: dict, config: StudyConfig) -> dict:
    analysis = {"rules": __doc__.split("Rules (also printed in the report):")[1].strip(), "models": {}}
    for model_label, model in results["models"].items():
        fp = model["variants"][UNQUANTIZED]
        per_model = {"comparisons": [], "resources": {}, "verdicts": {"better": 0, "worse": 0, "tie": 0, "uninformative": 0}}
        for variant_label, variant in model["variants"].items():
            if variant_label == UNQUANTIZED:
                continue
            for dataset, result in variant["datasets"].items():
                base = fp["datasets"][dataset]
                a, b = read_records(base["records_file"]), read_records(result["records_file"])
                for metric, field, binary in PRIMARY[result["task"]]:
                    cmp = compare(a, b, field, binary)
                    v = verdict(cmp, binary)
                    per_model["verdicts"][v] += 1
                    base_value = base["metrics"][metric]["value"]
                    relative = (100 * (cmp["b"] - cmp["a"]) / cmp["a"]
                                if cmp["a"] >= RELATIVE_MIN_BASE else None)
                    per_model["comparisons"].append({
                        "variant": variant_label, "dataset": dataset, "task": result["task"], "metric": metric,
                        "n": cmp["n"], "unquantized": base_value, "unquantized_ci95": base["metrics"][metric]["ci95"],
                        "quantized": result["metrics"][metric]["value"], "quantized_ci95": result["metrics"][metric]["ci95"],
                        "difference_points": cmp["difference_points"], "difference_ci95_points": cmp["ci95_points"],
                        "mcnemar_p": cmp.get("mcnemar_p"), "relative_change_percent": relative, "verdict": v})
            paired = model.get("paired_latency")
            latencies = ((paired[UNQUANTIZED], paired[variant_label])
                         if paired and UNQUANTIZED in paired and variant_label in paired else None)
            per_model["resources"][variant_label] = _resources(fp["measure"], variant["measure"], latencies)
        per_model["decode_paths"] = _decode_paths(model.get("paired_latency") or {})
        per_model["conclusions"] = _conclusions(model_label, per_model)
        analysis["models"][model_label] = per_model
    return analysis


def _resources(fp: dict, q: dict, latencies: tuple | None = None) -> dict:
    """Storage, memory and latency of the unquantized (fp) and a quantized (q) variant. Latency comes
    from ``latencies`` (the pair timed side by side) when given, else from each variant's own run."""
    def reduction(a, b):
        return 100.0 * (1.0 - b / a) if a else None

    fp_latency, q_latency = latencies if latencies is not None else (fp["latency"], q["latency"])

    out = {"weight_mib": [fp["storage"]["weight_bytes"] / MIB, q["storage"]["weight_bytes"] / MIB],
           "weight_reduction_percent": reduction(fp["storage"]["weight_bytes"], q["storage"]["weight_bytes"]),
           "parameters": [fp["storage"]["parameters"], q["storage"]["parameters"]],
           "bits_per_weight": [fp["storage"]["bits_per_weight"], q["storage"]["bits_per_weight"]],
           "decode_ms": [fp_latency["decode_ms_per_token_median"], q_latency["decode_ms_per_token_median"]],
           "decode_p90_ms": [fp_latency["decode_ms_per_token_p90"], q_latency["decode_ms_per_token_p90"]],
           "decode_ratio": q_latency["decode_ms_per_token_median"] / fp_latency["decode_ms_per_token_median"],
           "prefill_ms": [fp_latency["prefill_ms"], q_latency["prefill_ms"]],
           "latency_side_by_side": latencies is not None}
    out.update(_decode_comparison(fp_latency, q_latency, latencies is not None))
    if fp["storage"].get("disk_bytes") and q["storage"].get("disk_bytes"):
        out["disk_mib"] = [fp["storage"]["disk_bytes"] / MIB, q["storage"]["disk_bytes"] / MIB]
        out["disk_reduction_percent"] = reduction(fp["storage"]["disk_bytes"], q["storage"]["disk_bytes"])
    if "memory" in fp and "memory" in q:
        # CPU: the whole process's peak (interpreter and libraries included, the same for both), since
        # the growth over the interpreter's own peak is below resolution for small models.
        key = "generation_peak_allocated_mib" if fp["memory"]["kind"] == "cuda" else "peak_mib"
        out["memory_kind"] = fp["memory"]["kind"]
        out["memory_mib"] = [fp["memory"][key], q["memory"][key]]
        out["memory_reduction_percent"] = reduction(fp["memory"][key], q["memory"][key])
    return out


def _decode_paths(paired: dict) -> dict:
    """Each variant's default decode path (brecq's C++ runtime on the CPU) against the same model
    through transformers, timed in the same side-by-side run: medians and the ratio's interval."""
    from ..measurement.timing import ratio_interval

    out = {}
    for label, other in paired.items():
        if not label.endswith(TRANSFORMERS_SUFFIX):
            continue
        variant = label[: -len(TRANSFORMERS_SUFFIX)]
        default = paired.get(variant)
        if not default:
            continue
        a, b = other.get("decode_ms_samples") or [], default.get("decode_ms_samples") or []
        ratio, ci = ratio_interval(a, b) if len(a) == len(b) >= 2 else (None, None)
        out[variant] = {"path": (default.get("environment") or {}).get("decode_path", "default"),
                        "default_ms": [default["decode_ms_per_token_median"], default["decode_ms_per_token_p90"]],
                        "transformers_ms": [other["decode_ms_per_token_median"], other["decode_ms_per_token_p90"]],
                        "ratio": ratio, "ratio_ci95": list(ci) if ci else None}
    return out


def _decode_comparison(fp_latency: dict, q_latency: dict, side_by_side: bool) -> dict:
    """The decode-time ratio's 95 % interval from the paired step samples of a side-by-side run, the
    machine's load meanwhile, and the verdict (withheld when the machine was busy)."""
    from ..measurement.timing import ratio_interval, speed_verdict

    a, b = fp_latency.get("decode_ms_samples") or [], q_latency.get("decode_ms_samples") or []
    if not side_by_side or len(a) != len(b) or len(a) < 2:
        return {"decode_ratio_ci95": None, "decode_load": None,
                "decode_verdict": "not measured side by side"}
    _, ci = ratio_interval(a, b)
    load = q_latency.get("load") or {}
    return {"decode_ratio_ci95": list(ci), "decode_load": load, "decode_verdict": speed_verdict(ci, load)}


def _conclusions(model_label: str, per_model: dict) -> dict:
    lines, recommendations = [], []
    by_variant: dict[str, list] = {}
    for c in per_model["comparisons"]:
        by_variant.setdefault(c["variant"], []).append(c)
    for variant, comparisons in by_variant.items():
        worse = [c for c in comparisons if c["verdict"] == "worse"]
        better = [c for c in comparisons if c["verdict"] == "better"]
        res = per_model["resources"][variant]
        if worse:
            lines.append(f"{variant} loses accuracy significantly on " + "; ".join(
                f"{c['dataset']} {c['metric']} ({signed_pts(c['difference_points'])} points, 95 % CI "
                f"{signed_pts(c['difference_ci95_points'][0])} to {signed_pts(c['difference_ci95_points'][1])})" for c in worse) + ".")
        if better:
            lines.append(f"{variant} scores significantly higher on " + "; ".join(
                f"{c['dataset']} {c['metric']} ({signed_pts(c['difference_points'])} points)" for c in better) + ".")
        silent = [c for c in comparisons if c["verdict"] == "uninformative"]
        if silent:
            lines.append(f"{variant}: " + "; ".join(f"{c['dataset']} {c['metric']}" for c in silent)
                         + " cannot tell (both variants at the metric's floor or ceiling on every example).")
        informative = [c for c in comparisons if c["verdict"] != "uninformative"]
        if not worse and not better and informative:
            width = max(max(abs(c["difference_ci95_points"][0]), abs(c["difference_ci95_points"][1]))
                        for c in informative)
            n = min(c["n"] for c in informative)
            lines.append(f"{variant} shows no significant accuracy change on the informative comparisons (n >= {n} "
                         f"each); the intervals still allow differences of up to {width:.1f} points.")
        factor = res["weight_mib"][0] / res["weight_mib"][1]
        lines.append(f"{variant} weights take {res['weight_mib'][1]:.1f} MiB instead of {res['weight_mib'][0]:.1f} MiB "
                     f"({factor:.2f}x smaller).")
        ratio, ci = res["decode_ratio"], res.get("decode_ratio_ci95")
        speed = res.get("decode_verdict", "not measured side by side")
        measured = f"time per token x{ratio:.2f}" + (f", 95 % interval x{ci[0]:.2f} to x{ci[1]:.2f}" if ci else "")
        if speed in ("faster", "slower"):
            lines.append(f"{variant} decodes {speed} than the unquantized model ({measured}).")
        elif speed == "no clear difference":
            lines.append(f"{variant} shows no clear difference in decode speed from the unquantized model ({measured}).")
        elif speed == "withheld":
            lines.append(f"{variant}: no verdict on decode speed, the machine was busy while it was timed "
                         f"({res['decode_load']['reason']}; {measured}).")
        else:
            lines.append(f"{variant}: decode speed not compared ({speed}; {measured}).")
        if worse:
            recommendations.append(f"Do not use {variant} of {model_label} where "
                                   + ", ".join(sorted({c['dataset'] for c in worse}))
                                   + " matters without further tuning (significant loss).")
        elif factor >= 1.5 and not informative:
            recommendations.append(f"{variant} of {model_label}: no evaluation here could show an accuracy "
                                   "change either way; measure on a task the model can do before choosing it.")
        elif factor >= 1.5:
            recommendations.append(f"{variant} of {model_label} is recommended where memory is the constraint: "
                                   f"{factor:.2f}x smaller with no significant accuracy loss"
                                   + {"faster": ", and faster at decode.", "slower": ", though slower at decode.",
                                      "no clear difference": ", at no clear difference in decode speed."}.get(
                                       speed, " (decode speed: no verdict)."))
        else:
            recommendations.append(f"{variant} of {model_label} saves too little memory ({factor:.2f}x) to recommend.")
    return {"findings": lines, "recommendations": recommendations}


# ---------------------------------------------------------------------------------------------------
def change(reduction_percent: float) -> str:
    return (f"{reduction_percent:.1f} % smaller" if reduction_percent >= 0
            else f"{-reduction_percent:.1f} % larger")


def ci(pair) -> str:
    return f"[{pts(pair[0])}, {pts(pair[1])}]"


def comparison_row(c: dict) -> str:
    rel = f"{c['relative_change_percent']:+.1f} %" if c["relative_change_percent"] is not None else "—"
    p = f"{c['mcnemar_p']:.3g}" if c["mcnemar_p"] is not None else "—"
    return (f"| {c['variant']} | {c['dataset']} | {c['metric']} | {c['n']} | {pts(c['unquantized'])} {ci(c['unquantized_ci95'])} | "
            f"{pts(c['quantized'])} {ci(c['quantized_ci95'])} | {signed_pts(c['difference_points'])} "
            f"[{signed_pts(c['difference_ci95_points'][0])}, {signed_pts(c['difference_ci95_points'][1])}] | {p} | {rel} | "
            f"{c['verdict']} |")


def resource_rows(variant: str, r: dict) -> list[str]:
    rows = [f"| {variant} | weights in memory (MiB) | {r['weight_mib'][0]:.2f} | {r['weight_mib'][1]:.2f} | "
            f"{change(r['weight_reduction_percent'])} |",
            f"| {variant} | parameters (logical) | {r['parameters'][0]:,} | {r['parameters'][1]:,} | same |"
            if r["parameters"][0] == r["parameters"][1] else
            f"| {variant} | parameters (logical) | {r['parameters'][0]:,} | {r['parameters'][1]:,} | differ |",
            f"| {variant} | bits per weight | {r['bits_per_weight'][0]:.3f} | {r['bits_per_weight'][1]:.3f} | |"]
    if "disk_mib" in r:
        rows.append(f"| {variant} | weights on disk (MiB) | {r['disk_mib'][0]:.2f} | {r['disk_mib'][1]:.2f} | "
                    f"{change(r['disk_reduction_percent'])} |")
    if "memory_mib" in r:
        what = ("peak GPU memory in generation (MiB)" if r["memory_kind"] == "cuda"
                else "peak RSS of a process that loads and generates (MiB)")
        rows.append(f"| {variant} | {what} | {r['memory_mib'][0]:.1f} | {r['memory_mib'][1]:.1f} | "
                    f"{change(r['memory_reduction_percent'])} |")
    ci = r.get("decode_ratio_ci95")
    interval = f" [x{ci[0]:.2f}, x{ci[1]:.2f}]" if ci else ""
    verdict = r.get("decode_verdict", "")
    load = r.get("decode_load") or {}
    if verdict == "withheld":
        verdict = f"withheld: {load.get('reason', 'machine busy')}"
    rows += [f"| {variant} | decode ms/token, median (p90) | {r['decode_ms'][0]:.2f} ({r['decode_p90_ms'][0]:.2f}) | "
             f"{r['decode_ms'][1]:.2f} ({r['decode_p90_ms'][1]:.2f}) | x{r['decode_ratio']:.2f}{interval} {verdict} |",
             f"| {variant} | prefill ms | {r['prefill_ms'][0]:.1f} | {r['prefill_ms'][1]:.1f} | |"]
    return rows


def render_report(results: dict, plots: dict) -> str:
    analysis = results["analysis"]
    lines = [f"# {results['study']}: quantization study", ""]
    lines += ["## Executive summary", ""]
    for model_label, a in analysis["models"].items():
        v = a["verdicts"]
        lines.append(f"- **{model_label}**: {v['better']} better, {v['worse']} worse, {v['tie']} ties, "
                     f"{v['uninformative']} uninformative (rules below)")
        lines += [f"  - {f}" for f in a["conclusions"]["findings"]]
    lines += ["", "## Model configurations", ""]
    for model_label, m in results["models"].items():
        lines.append(f"- **{model_label}** ({m['role']}, chat template {'on' if m['chat_template'] else 'off'}): `{m['path']}`")
        for variant_label, variant in m["variants"].items():
            if variant_label == UNQUANTIZED:
                continue
            q = variant["quantization"]
            lines.append(f"  - {variant_label}: recipe `{q['recipe']['name']}`, method {q['recipe']['method']}, "
                         f"saved at `{variant['path']}`")
    lines += ["", "## Performance", "",
              "Values in points (percent) with 95 % intervals (Wilson for proportions, bootstrap for F1); the "
              "difference is quantized minus unquantized on the same examples, with Tango's paired score interval "
              "(binary metrics) or a paired bootstrap interval (F1), and McNemar's exact p.", ""]
    for model_label, a in analysis["models"].items():
        lines += [f"### {model_label}", "",
                  "| variant | dataset | metric | n | unquantized | quantized | difference (points) | McNemar p | relative | verdict |",
                  "|---|---|---|---:|---|---|---|---:|---:|---|"]
        lines += [comparison_row(c) for c in a["comparisons"]]
        lines.append("")
    lines += ["## Resource efficiency", ""]
    for model_label, a in analysis["models"].items():
        lines += [f"### {model_label}", "", "| variant | measure | unquantized | quantized | change |", "|---|---|---:|---:|---|"]
        for variant_label, r in a["resources"].items():
            lines += resource_rows(variant_label, r)
        lines.append("")
        if a.get("decode_paths"):
            lines += ["Decode times above are brecq's default path; the same models through transformers, timed in "
                      "the same interleaved run:", "",
                      "| variant | default path | ms/token, median (p90) | transformers ms/token, median (p90) | "
                      "default / transformers [95 % CI] |", "|---|---|---:|---:|---|"]
            for variant_label, d in a["decode_paths"].items():
                ratio = (f"x{d['ratio']:.2f} [x{d['ratio_ci95'][0]:.2f}, x{d['ratio_ci95'][1]:.2f}]"
                         if d["ratio_ci95"] else "—")
                lines.append(f"| {variant_label} | {d['path']} | {d['default_ms'][0]:.2f} ({d['default_ms'][1]:.2f}) | "
                             f"{d['transformers_ms'][0]:.2f} ({d['transformers_ms'][1]:.2f}) | {ratio} |")
            lines.append("")
    lines += ["## Technical details", ""]
    for model_label, m in results["models"].items():
        for variant_label, variant in m["variants"].items():
            if variant_label == UNQUANTIZED:
                continue
            q = variant["quantization"]
            rules = ", ".join(f"`{r['pattern']}` → W{r['bits']} g{r['group_size']}" for r in q["recipe"]["rules"])
            lines.append(f"- {model_label} / {variant_label}: {rules}; clipping {q['recipe']['clipping']}; "
                         f"packed format v{q['format_version']}, brecq {q['tool_version']}")
            if q.get("calibration"):
                c = q["calibration"]
                lines.append(f"  - calibration: {c['num_samples']} windows of {c['seq_len']} tokens from `{c['file']}` "
                             f"(seed {c['seed']}, columns {c['columns'] or 'all text'}, chat template {c['chat_template']})")
            if q.get("reconstruction"):
                r = q["reconstruction"]
                lines.append(f"  - reconstruction: {r['iters']} iterations, batch {r['batch_size']}, lr {r['lr']}, "
                             f"λ {r['reg_weight']}, warm-up {r['warmup']}, β {r['beta_start']}→{r['beta_end']}, "
                             f"loss {r['loss']}, block inputs {r['input_source']}")
            env = variant["measure"]["latency"]["environment"]
            lines.append(f"  - measured on {env['device']} ({env['processor']}), {env['dtype']}, {env['threads']} threads, "
                         f"torch {env['torch']}, transformers {env['transformers']}, CPU kernels {env['cpu_kernels']}, "
                         f"attention {env.get('attention') or 'not recorded'}, RMS norms {env.get('rms_norm') or 'not recorded'}")
            where = variant["measure"].get("measured_on") or {}
            if where.get("processes", 1) > 1:
                lines.append(f"  - size, latency and memory measured by rank {where['rank']} of {where['processes']} "
                             "torchrun processes, while the other ranks waited idle at a barrier")
    reused = results.get("reused") or []
    lines += ["", "## Reused from earlier runs", ""]
    lines += ([f"- {line}" for line in reused] if reused else ["Nothing: every result above was computed in this run."])
    lines += ["", "Results are reused only when everything they depend on is unchanged (model files, recipe, "
              "method and calibration, dataset file, evaluation and timing settings, brecq's version)."]
    lines += ["", "## Conclusions", ""]
    for model_label, a in analysis["models"].items():
        lines += [f"### {model_label}", ""] + [f"- {f}" for f in a["conclusions"]["findings"]] + [""]
    lines += ["### Recommendations", ""]
    for a in analysis["models"].values():
        lines += [f"- {r}" for r in a["conclusions"]["recommendations"]]
    lines += ["", "### Rules", "", analysis["rules"], ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}](plots/{Path(p).name})" for name, p in plots.items()] + [""]
    return "\n".join(lines)


def make_plots(results: dict, out: Path) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots")
        return {}
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    analysis = results["analysis"]
    models = list(analysis["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model_label in zip(axes[0], models):
        comps = [c for c in analysis["models"][model_label]["comparisons"]]
        labels = [f"{c['dataset']}\n{c['metric']}" for c in comps]
        xs = range(len(comps))
        for offset, (key, name) in enumerate((("unquantized", "unquantized"), ("quantized", "quantized"))):
            values = [100 * c[key] for c in comps]
            # Clamped at 0: rounding can put a bootstrap bound a hair past the mean.
            errs = [[max(0.0, 100 * (c[key] - c[f"{key}_ci95"][0])) for c in comps],
                    [max(0.0, 100 * (c[f"{key}_ci95"][1] - c[key])) for c in comps]]
            ax.bar([x + 0.38 * offset for x in xs], values, 0.38, yerr=errs, capsize=3, label=name)
        ax.set_xticks([x + 0.19 for x in xs], labels, fontsize=7)
        ax.set_ylabel("points (95 % CI)")
        ax.set_title(model_label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots["accuracy"] = out / "accuracy.png"
    fig.savefig(plots["accuracy"], dpi=110)
    plt.close(fig)

    # One column per model, so that each model's bars have a scale of their own (a 0.6B model and a
    # 260K one side by side made the small one's bars invisible).
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models) + 1, 7), squeeze=False)
    for column, model_label in enumerate(models):
        m = results["models"][model_label]
        paired = m.get("paired_latency") or {}
        resources = analysis["models"][model_label]["resources"]
        names = ["unquantized", *resources]
        weights = [next(iter(resources.values()))["weight_mib"][0] if resources else 0.0]
        weights += [r["weight_mib"][1] for r in resources.values()]
        ax = axes[0][column]
        ax.bar(range(len(names)), weights, color="tab:blue")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylabel("MiB (exact)")
        ax.set_title(f"{model_label}: weights in memory", fontsize=9)
        medians, low, high = [], [], []
        for name in names:
            samples = sorted((paired.get(name) or {}).get("decode_ms_samples") or [])
            if samples:
                median = samples[len(samples) // 2]
                medians.append(median)
                low.append(median - samples[len(samples) // 4])
                high.append(samples[(3 * len(samples)) // 4] - median)
            else:
                medians.append((paired.get(name) or {}).get("decode_ms_per_token_median", 0.0))
                low.append(0.0)
                high.append(0.0)
        ax = axes[1][column]
        ax.bar(range(len(names)), medians, yerr=[low, high], capsize=4, color="tab:orange")
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylabel("ms per token (median, bars: quartiles)")
        ax.set_title(f"{model_label}: decode time, side by side", fontsize=9)
    fig.tight_layout()
    plots["resources"] = out / "resources.png"
    fig.savefig(plots["resources"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    drew = False
    for model_label, m in results["models"].items():
        for variant_label, variant in m["variants"].items():
            report = (variant.get("quantization") or {}).get("report") or {}
            blocks = report.get("blocks") or []
            if blocks:
                ax.plot([b["index"] for b in blocks], [b["loss_final"] for b in blocks], marker="o",
                        label=f"{model_label} / {variant_label}")
                if any(b.get("loss_nearest") for b in blocks):
                    ax.plot([b["index"] for b in blocks], [b["loss_nearest"] or float("nan") for b in blocks],
                            linestyle="--", label=f"{model_label} / round to nearest")
                drew = True
    if drew:
        from matplotlib.ticker import MaxNLocator

        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Block reconstruction loss", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("reconstruction loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plots["blocks"] = out / "blocks.png"
        fig.savefig(plots["blocks"], dpi=110)
    plt.close(fig)
    return {name: str(path) for name, path in plots.items()}


def write_outputs(results: dict, config: StudyConfig) -> None:
    out = Path(config.output)
    plots = make_plots(results, out / "plots")
    results["plots"] = plots
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "report.md", render_report(results, plots))
    log.info("wrote %s and %s", out / "results.json", out / "report.md")
