"""Side-by-side timing of packed and dense linear layers (the demo's speed table; the full
benchmark suite is bench/)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brecq_ext import Layout, ops
from brecq_ext.arena import place_tensors
from brecq_ext.format import layer_storage, num_groups, packed_row_bytes
from brecq_ext.layout import preferred_layout, to_tile16


@dataclass(frozen=True)
class MatmulTiming:
    name: str
    in_features: int
    out_features: int
    rows: int
    dense_bf16_us: float
    packed_us: dict  # bits -> median microseconds
    layouts: dict  # bits -> the Layout timed: the one QuantLinear holds on this machine

    def speedup(self, bits: int) -> float:
        return self.dense_bf16_us / self.packed_us[bits]


def _median_us(fn, weights, repeats: int) -> float:
    fn(weights[0])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(weights[i % len(weights)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def random_packed_weights(out_features: int, in_features: int, bits: int, group_size: int, copies: int,
                          generator: torch.Generator):
    """Distinct packed weights with random codes (speed does not depend on the values)."""
    groups = num_groups(in_features, group_size)
    row_bytes = packed_row_bytes(in_features, group_size, bits)
    out = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (out_features, row_bytes), dtype=torch.uint8, generator=generator)
        scale = (torch.rand(out_features, groups, generator=generator) * 0.01 + 1e-3).half()
        zero = torch.randint(0, 1 << bits, (out_features, groups), dtype=torch.uint8, generator=generator)
        out.append((packed, scale, zero))
    return out


def in_one_region(copies: list) -> list:
    """Weight copies (tuples of tensors, e.g. packed, scale, zero) placed back to back in one
    huge-page region, as ``brecq_ext.gather_quantized_weights`` places a quantized model's layers."""
    width = len(copies[0])
    _, placed = place_tensors([t for copy in copies for t in copy])
    return [tuple(placed[i:i + width]) for i in range(0, len(placed), width)]


def time_linear_shapes(shapes: dict, rows: int = 1, bits_list=(4, 6), group_size: int = 64,
                       footprint_bytes: int = 64 << 20, repeats: int = 50, seed: int = 0):
    """Median time of one bfloat16 matmul per shape, dense vs packed, cycling through enough
    distinct weights (``footprint_bytes`` per variant) that they do not stay in cache. Packed
    weights are timed in the layout a CPU QuantLinear holds them in on this machine and placed as a
    quantized model's are (one huge-page region), through the call its forward makes."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for name, (k, n) in shapes.items():
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        dense_copies = max(2, footprint_bytes // (n * k * 2))
        dense = [torch.randn(n, k, generator=generator).to(torch.bfloat16) for _ in range(dense_copies)]
        dense_us = _median_us(lambda w: F.linear(x, w), dense, repeats)
        del dense
        packed_us, layouts = {}, {}
        for bits in bits_list:
            copies = max(2, footprint_bytes // layer_storage(n, k, bits, group_size).total_bytes)
            weights = random_packed_weights(n, k, bits, group_size, copies, generator)
            layouts[bits] = preferred_layout("cpu", bits, group_size)
            if layouts[bits] is Layout.TILE16:
                weights = in_one_region([to_tile16(*w, bits, group_size, k) for w in weights])
                packed_us[bits] = _median_us(lambda w: ops.tile16_linear(
                    x, *w, None, bits, group_size, k, n, weights_checked=True), weights, repeats)
            else:
                weights = in_one_region(weights)
                packed_us[bits] = _median_us(lambda w: ops.linear(
                    x, *w, None, bits, group_size, k, weights_checked=True), weights, repeats)
        results.append(MatmulTiming(name, k, n, rows, dense_us, packed_us, layouts))
    return results
