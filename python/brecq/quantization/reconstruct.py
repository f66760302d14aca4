"""BRECQ block reconstruction with AdaRound learned rounding (Li et al., 2021; Nagel et al., 2020).

Layering: quantizer parameters (brecq_ext.ops.quant_params) -> rounding (AdaRound variables V,
brecq_ext.ops.adaround_forward) -> quantized module (AdaRoundLinear) -> block -> reconstruct(block,
cached inputs and targets, loss, schedule).
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from brecq_ext import Clipping, LayerRule, ops, reference

from .blocks import BlockCall, linear_layers, set_submodule

log = logging.getLogger("brecq")


class LossKind(enum.Enum):
    MSE = "mse"  # squared error of the block output
    FISHER = "fisher"  # squared error weighted by the diagonal Fisher (squared LM-loss gradients)


class InputSource(enum.Enum):
    QUANTIZED = "quantized"  # block input from the already-quantized preceding blocks
    FULL_PRECISION = "full_precision"  # block input from the full-precision model


@dataclass(frozen=True)
class ReconstructionConfig:
    """Defaults are sized for minutes on a GPU for Qwen3-0.6B and well under a minute a block for
    small models on a CPU: 800 iterations instead of the paper's 20k, so the Adam learning rate of
    the rounding variables is 1e-2 instead of 1e-3 (on stories260k, 200 iterations at 1e-3 recover
    little of what 400 at 1e-2 do, and 800 beat 400 on the mixed recipe; docs/QUALITY.md)."""

    iters: int = 800
    batch_size: int = 8
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    loss: LossKind = LossKind.MSE
    input_source: InputSource = InputSource.QUANTIZED
    seed: int = 0

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"ReconstructionConfig: iters and batch_size must be >= 1, got {self.iters}, {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"ReconstructionConfig: warmup must be in [0, 1), got {self.warmup}")
        if not (self.lr > 0 and self.reg_weight >= 0 and self.beta_start >= self.beta_end > 0):
            raise ValueError("ReconstructionConfig: need lr > 0, reg_weight >= 0, beta_start >= beta_end > 0")
        if not isinstance(self.loss, LossKind) or not isinstance(self.input_source, InputSource):
            raise TypeError("ReconstructionConfig: loss must be a LossKind and input_source an InputSource")

    def beta(self, step: int) -> float:
        """Annealed exponent of the rounding regulariser: beta_start until the warm-up ends, then
        linear to beta_end."""
        start = self.warmup * self.iters
        if step < start:
            return self.beta_start
        progress = (step - start) / max(1.0, self.iters - start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)

    def regularizing(self, step: int) -> bool:
        return step >= self.warmup * self.iters


@dataclass
class LayerCodes:
    """The result for one linear layer: integer codes uint8 [out, in], per-group scale float16 and
    zero uint8 [out, groups]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int


class Rounding(enum.Enum):
    SOFT = "soft"  # h(V) in [0, 1]: differentiable, used while learning
    LEARNED = "learned"  # h(V) >= 0.5 rounds up: the final codes
    NEAREST = "nearest"  # round to nearest with the same scales: the RTN baseline


class AdaRoundLinear(nn.Module):
    """A linear layer whose rounding is learned: w = scale * (clamp(floor(w/scale) + h(V) + zero) - zero)."""

    def __init__(self, linear: nn.Linear, rule: LayerRule, clipping: Clipping, device):
        super().__init__()
        weight = linear.weight.detach().to(device=device, dtype=torch.float32)
        self.bits, self.group_size = rule.bits, rule.group_size
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(device).float())
        scale, zero = ops.quant_params(weight, rule.bits, rule.group_size, clipping.search_steps)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.v = nn.Parameter(reference.adaround_init(weight, scale, rule.group_size))
        self.rounding = Rounding.SOFT

    def forward(self, x):
        if self.rounding is Rounding.SOFT:
            return _SoftRoundedLinear.apply(x, self.v, self)
        codes = self.hard_codes() if self.rounding is Rounding.LEARNED else self.nearest_codes()
        w = ops.dequantize(codes, self.scale, self.zero, self.group_size)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def soft_weight(self, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return ops.adaround_forward(self.weight, v, self.scale, self.zero, self.bits, self.group_size).to(dtype)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return ops.rounding_loss(self.v, beta)

    def hard_codes(self) -> torch.Tensor:
        return reference.adaround_harden(self.weight, self.v.detach(), self.scale, self.zero, self.bits,
                                         self.group_size)

    def nearest_codes(self) -> torch.Tensor:
        return ops.quantize(self.weight, self.scale, self.zero, self.bits, self.group_size)

    def result(self) -> LayerCodes:
        return LayerCodes(self.hard_codes().cpu(), self.scale.cpu(), self.zero.cpu(), self.bits, self.group_size)


class _SoftRoundedLinear(torch.autograd.Function):
    """``x @ w(V)^T + bias`` with the soft-rounded weight computed again in backward instead of
    kept from forward: autograd would hold every layer's dense weight from its forward until its
    backward, one more float copy of the whole block at the step's peak."""

    @staticmethod
    def forward(ctx, x, v, layer):
        ctx.save_for_backward(x, v)
        ctx.layer = layer
        return F.linear(x, layer.soft_weight(v, x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, v = ctx.saved_tensors
        layer = ctx.layer
        w = layer.soft_weight(v, x.dtype)
        grad_x = grad @ w if ctx.needs_input_grad[0] else None
        del w
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_v = ops.adaround_backward(grad_w.float(), layer.weight, v, layer.scale, layer.zero, layer.bits,
                                       layer.group_size)
        return grad_x, grad_v, None


def _reconstruction_loss(pred, target, fisher):
    err = (pred - target).square()
    if fisher is not None:
        err = err * fisher
    return err.sum(-1).mean()


@torch.no_grad()
def _evaluate(block, inputs, targets, fisher, call, device, batch_size):
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start:start + batch_size].to(device)
        out = block(x, **call.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        f = fisher[start:start + batch_size].to(device).float() if fisher is not None else None
        total += _reconstruction_loss(out.float(), targets[start:start + batch_size].to(device), f).item() * x.shape[0]
        count += x.shape[0]
    return total / count


def _sum_gradients(params) -> None:
    """Sum the parameters' gradients over the ranks, in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


@dataclass
class BlockReconstruction:
    layers: dict  # relative name -> LayerCodes
    loss_nearest: float  # reconstruction loss with round-to-nearest codes (same scales)
    loss_final: float  # with the learned, hardened codes
    seconds: float


def reconstruct_block(block: nn.Module, rules: dict[str, LayerRule], inputs: torch.Tensor, targets: torch.Tensor,
                      call: BlockCall, config: ReconstructionConfig, clipping: Clipping, device,
                      fisher: torch.Tensor | None = None, block_index: int = 0,
                      show_progress: bool = True, data_parallel: bool = False,
                      layers: dict[str, nn.Module] | None = None) -> BlockReconstruction:
    """Learn the rounding of every linear layer named in ``rules`` (names relative to ``block``)
    so that the block's output on ``inputs`` [N, T, D] matches ``targets`` [N, T, D] (float32, CPU).
    The block is modified only temporarily and returned to its original layers.

    ``data_parallel``: every rank of the torch.distributed group calls this with the same block,
    data and settings; each step's batch (drawn alike on every rank) is split across the ranks,
    and the rounding variables' gradients are summed over them, so every rank takes the step one
    process would take on the whole batch (up to the order of the float sums).

    ``layers``: soft-rounding modules built by the caller for some of the block's layers (names
    relative to ``block``; e.g. ``brecq.kquants.GridAdaRoundLinear`` on a llama.cpp grid), used
    instead of an ``AdaRoundLinear`` from ``rules``; their ``result()`` is what is returned."""
    started = time.perf_counter()
    originals = linear_layers(block)
    layers = layers or {}
    quantized = {name: AdaRoundLinear(originals[name], rule, clipping, device)
                 for name, rule in rules.items() if name not in layers}
    quantized.update(layers)
    block_device = next(block.parameters()).device
    block.to(device)
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for name, layer in quantized.items():
        set_submodule(block, name, layer)
    call = call.to(device)
    def set_rounding(rounding):
        for layer in quantized.values():
            layer.rounding = rounding

    try:
        set_rounding(Rounding.NEAREST)
        loss_nearest = _evaluate(block, inputs, targets, fisher, call, device, config.batch_size)
        set_rounding(Rounding.SOFT)

        params = [layer.v for layer in quantized.values()]
        # Fused: one pass over the parameters, none of foreach's temporary copies of the whole block.
        optimizer = torch.optim.Adam(params, lr=config.lr, fused=torch.device(device).type in ("cpu", "cuda"))
        rank, ranks = 0, 1
        if data_parallel and torch.distributed.is_initialized():
            rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
        generator = torch.Generator().manual_seed(config.seed * 100003 + block_index)
        steps = tqdm(range(config.iters), desc=f"block {block_index}", leave=False, disable=not show_progress)
        for step in steps:
            idx = torch.randint(0, inputs.shape[0], (min(config.batch_size, inputs.shape[0]),), generator=generator)
            batch = len(idx)
            if ranks > 1:
                idx = idx[rank::ranks]  # this rank's share of the step's batch
            optimizer.zero_grad(set_to_none=True)
            rec = torch.zeros((), device=device)
            if len(idx):
                x, y = inputs[idx].to(device), targets[idx].to(device)
                f = fisher[idx].to(device).float() if fisher is not None else None
                out = block(x, **call.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                # The batch mean, as this rank's share of it: the shares sum to the whole batch's.
                rec = _reconstruction_loss(out.float(), y, f) * (len(idx) / batch)
            loss = rec
            if config.regularizing(step) and config.reg_weight > 0 and rank == 0:  # counted once
                beta = config.beta(step)
                loss = loss + config.reg_weight * sum(layer.rounding_loss(beta) for layer in quantized.values())
            if loss.requires_grad:
                loss.backward()
            if ranks > 1:
                _sum_gradients(params)
            optimizer.step()
            if step % 50 == 0 or step == config.iters - 1:
                steps.set_postfix(rec=f"{rec.item():.4g}", total=f"{loss.item():.4g}")

        set_rounding(Rounding.LEARNED)
        loss_final = _evaluate(block, inputs, targets, fisher, call, device, config.batch_size)
        results = {name: layer.result() for name, layer in quantized.items()}
    finally:
        for name, layer in originals.items():
            set_submodule(block, name, layer)
        for p, requires in frozen:
            p.requires_grad_(requires)
        block.to(block_device)
    return BlockReconstruction(results, loss_nearest, loss_final, time.perf_counter() - started)
