"""The offline demo: quantize a Qwen3-architecture model built from a config, report sizes,
fidelity and matmul speed. Runs on a CPU without network in well under a minute."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brecq_ext import Clipping, LayerRule, cpu_isa, quant_linear_layers, replace_linear_layers

from ..models import QWEN3_0_6B_LINEAR_SHAPES, build_model, qwen3_config
from ..measurement.speed import time_linear_shapes

log = logging.getLogger("brecq")

# The study's mixed recipe: W6 for attention projections, W4 for the MLP, group size 64.
MIXED_W4_ATTN6_RULES = (
    LayerRule(r"self_attn\.(q|k|v|o)_proj$", bits=6, group_size=64),
    LayerRule(r"mlp\.(gate|up|down)_proj$", bits=4, group_size=64),
)


@dataclass
class DemoResult:
    layers: int
    linear_weights: int
    dense_linear_bytes: int
    packed_linear_bytes: int
    per_module: list  # (name, bits, group_size, bytes, bits_per_weight)
    top1_agreement: float
    mean_kl: float
    timings: list  # MatmulTiming

    @property
    def linear_bits_per_weight(self) -> float:
        return 8.0 * self.packed_linear_bytes / self.linear_weights


def run_demo(layers: int = 2, seed: int = 0, tokens: int = 64, clipping: Clipping = Clipping.MSE,
             speed_repeats: int = 50) -> DemoResult:
    """Qwen3-0.6B-shaped decoder with ``layers`` layers and seeded weights, quantized round-to-
    nearest with the mixed W6/W4 recipe (BRECQ reconstruction comes with the engine)."""
    config = qwen3_config("0.6b", num_hidden_layers=layers)
    model = build_model(config, seed=seed)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in name}
    linear_weights = sum(m.weight.numel() for m in linears.values())
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())

    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference_logits = model(ids).logits.float()
    log.info("quantizing %d linear layers (%s clipping)", len(linears), clipping.value)
    replace_linear_layers(model, MIXED_W4_ATTN6_RULES, clipping=clipping)
    with torch.no_grad():
        logits = model(ids).logits.float()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference_logits, -1), log_target=True,
                  reduction="none").sum(-1).mean().item()
    agreement = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()

    per_module = []
    packed_bytes = 0
    for name, layer in quant_linear_layers(model):
        st = layer.storage()
        packed_bytes += layer.memory_bytes()
        per_module.append((name, layer.bits, layer.group_size, layer.memory_bytes(), st.bits_per_weight))
    timings = time_linear_shapes(QWEN3_0_6B_LINEAR_SHAPES, rows=1, repeats=speed_repeats, seed=seed)
    return DemoResult(layers, linear_weights, dense_bytes, packed_bytes, per_module, agreement, kl, timings)


def format_demo(result: DemoResult) -> str:
    lines = [
        f"Qwen3-0.6B-shaped decoder, {result.layers} layers, seeded random weights (not a trained model)",
        f"CPU kernels: {cpu_isa()}, threads: {torch.get_num_threads()}",
        "",
        "| module | bits | group | bytes | bits/weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, bits, group, nbytes, bpw in result.per_module[:7]:
        lines.append(f"| {name} | {bits} | {group} | {nbytes:,} | {bpw:.3f} |")
    if len(result.per_module) > 7:
        lines.append(f"| ... {len(result.per_module) - 7} more | | | | |")
    lines += [
        "",
        f"decoder linear weights: {result.linear_weights:,} "
        f"({result.dense_linear_bytes / 2**20:.1f} MiB float32 -> {result.packed_linear_bytes / 2**20:.1f} MiB packed, "
        f"{result.linear_bits_per_weight:.3f} bits/weight, "
        f"{result.dense_linear_bytes / result.packed_linear_bytes:.2f}x smaller)",
        f"fidelity vs float32 on random tokens: top-1 agreement {100 * result.top1_agreement:.1f} %, "
        f"mean KL {result.mean_kl:.4f} nats (random weights: indicative only)",
        "",
        "1-row bfloat16 matmul, median us (weights cycled so they come from memory; packed layouts as "
        "QuantLinear holds them here: "
        + ", ".join(f"W{bits} {layout.value}" for bits, layout in result.timings[0].layouts.items()) + "):",
        "| layer | in -> out | dense bf16 | W4 g64 | W6 g64 | W4 speed-up | W6 speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in result.timings:
        lines.append(f"| {t.name} | {t.in_features} -> {t.out_features} | {t.dense_bf16_us:.0f} | "
                     f"{t.packed_us[4]:.0f} | {t.packed_us[6]:.0f} | {t.speedup(4):.2f}x | {t.speedup(6):.2f}x |")
    return "\n".join(lines)
