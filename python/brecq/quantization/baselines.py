"""Baselines through the same interface and packed format as BRECQ: round-to-nearest (RTN) and
GPTQ (Frantar et al., 2022: column-by-column quantization with Hessian-based error compensation)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from brecq_ext import Clipping, LayerRule, ops
from brecq_ext.format import max_code

from .blocks import BlockCall, linear_layers
from .reconstruct import LayerCodes

log = logging.getLogger("brecq")


def rtn_layer(linear: nn.Linear, rule: LayerRule, clipping: Clipping) -> LayerCodes:
    w = linear.weight.detach().float()  # on the layer's device: the CUDA kernels serve a GPU model
    scale, zero = ops.quant_params(w, rule.bits, rule.group_size, clipping.search_steps)
    return LayerCodes(ops.quantize(w, scale, zero, rule.bits, rule.group_size), scale, zero, rule.bits,
                      rule.group_size)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # columns updated together (rounded to a multiple of the group size)
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (groups stay static)

    def __post_init__(self):
        if not 0 <= self.damp < 1 or self.block_size < 1:
            raise ValueError(f"GPTQConfig: need 0 <= damp < 1 and block_size >= 1, got {self.damp}, {self.block_size}")


def gptq_layer(weight: torch.Tensor, hessian: torch.Tensor, rule: LayerRule, clipping: Clipping,
               config: GPTQConfig, *, overwrite_hessian: bool = False) -> LayerCodes:
    """GPTQ on weight float32 [N, K] with the layer-input Hessian float64 [K, K] (2/n sum x x^T).
    ``overwrite_hessian`` lets it work in the caller's Hessian instead of a copy (the caller gives
    it up): at K = 3072 each float64 [K, K] is 75 MB, and a streamed run counts them."""
    bits, g = rule.bits, rule.group_size
    qmax = float(max_code(bits))
    W = weight.detach().to(torch.float64).clone()
    n, k = W.shape
    H = hessian.to(torch.float64)
    del hessian
    if not overwrite_hessian:
        H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = -(-k // g)
    if config.act_order:
        # Static groups: parameters from the original weights, before any column is updated.
        scale, zero = ops.quant_params(W.float(), bits, g, clipping.search_steps)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scale = torch.empty(n, groups, dtype=torch.float16)
        zero = torch.empty(n, groups, dtype=torch.uint8)
        perm = torch.arange(k)
    H.diagonal().add_(config.damp * torch.mean(torch.diag(H)))  # + damp * I, without a [K, K] identity
    # Cholesky, inverse, upper Cholesky of the inverse, each in H's own storage (LAPACK works in
    # place): one [K, K] buffer, however long the caller keeps its reference to the Hessian.
    torch.linalg.cholesky(H, out=H)
    torch.cholesky_inverse(H, out=H)
    Hinv = torch.linalg.cholesky(H, upper=True, out=H)
    del H

    codes = torch.empty(n, k, dtype=torch.uint8)
    block = max(g, config.block_size // g * g)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not config.act_order and col % g == 0:
                s_grp, z_grp = ops.quant_params(W1[:, i:i + g].float(), bits, g, clipping.search_steps)
                scale[:, col // g], zero[:, col // g] = s_grp[:, 0], z_grp[:, 0]
            grp = int(perm[col]) // g
            s, z = scale[:, grp].to(torch.float64), zero[:, grp].to(torch.float64)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            e = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    if config.act_order:
        codes = codes[:, torch.argsort(perm)]
    return LayerCodes(codes, scale, zero, bits, g)


@torch.no_grad()
def layer_hessians(block: nn.Module, names, inputs: torch.Tensor, call: BlockCall, device,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """2/n sum x x^T of each named linear layer's inputs while the block runs on ``inputs``."""
    layers = linear_layers(block)
    sums = {name: torch.zeros(layers[name].in_features, layers[name].in_features, dtype=torch.float64)
            for name in names}
    counts = dict.fromkeys(names, 0)

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if x.device == sums[name].device:
                sums[name].addmm_(x.t(), x)  # no [K, K] temporary beside the sum
            else:  # the product on the block's device, the sum on the CPU
                sums[name] += (x.t() @ x).cpu()
            counts[name] += x.shape[0]
        return hook

    handles = [layers[name].register_forward_pre_hook(make_hook(name)) for name in names]
    call = call.to(device)
    try:
        for start in range(0, inputs.shape[0], batch_size):
            block(inputs[start:start + batch_size].to(device), **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    # In place: a scaled copy would hold every Hessian twice at the block's peak.
    return {name: sums[name].mul_(2.0 / max(1, counts[name])) for name in names}


def gptq_block(block: nn.Module, rules: dict[str, LayerRule], inputs: torch.Tensor, call: BlockCall,
               clipping: Clipping, config: GPTQConfig, device, batch_size: int = 8):
    """GPTQ on every named linear of the block, Hessians from one pass of the full-precision block
    over ``inputs`` (the quantized model's inputs to this block)."""
    started = time.perf_counter()
    block_device = next(block.parameters()).device
    block.to(device)
    try:
        hessians = layer_hessians(block, list(rules), inputs, call, device, batch_size)
    finally:
        block.to(block_device)
    layers = linear_layers(block)
    results = {}
    for name, rule in rules.items():  # each Hessian is freed as soon as its layer is done
        results[name] = gptq_layer(layers[name].weight.detach().float().cpu(), hessians.pop(name), rule, clipping,
                                   config, overwrite_hessian=True)
    return results, time.perf_counter() - started
