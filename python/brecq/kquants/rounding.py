"""AdaRound on a llama.cpp block type's grid: the steps, zeros and mins are the search's; only the
rounding of each weight (down or up from ``floor``) is learned."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brecq_ext import ops, reference

from ..quantization.reconstruct import Rounding
from .layouts import Grid


class GridAdaRoundLinear(nn.Module):
    """``value = scale * (clamp(floor(x) + h(V), 0, qmax) - zero) - offset``, with
    ``x = (w + offset) / scale + zero`` the weight's position on the grid. The interface of
    ``brecq.quantization.reconstruct.AdaRoundLinear``: ``rounding``, ``v``, ``rounding_loss``, ``result``.

    ``Rounding.NEAREST`` gives the codes the search chose (llama.cpp's own for its search), the
    baseline the learned rounding is measured against. Groups whose step is 0 hold ``-offset``
    whatever their codes."""

    def __init__(self, linear: nn.Linear, grid: Grid, device):
        super().__init__()
        weight = linear.weight.detach().to(device=device, dtype=torch.float32)
        if tuple(weight.shape) != grid.codes.shape:
            raise ValueError(f"GridAdaRoundLinear: grid is for {grid.codes.shape}, the layer is {tuple(weight.shape)}")
        self.qmax = grid.qmax

        def expanded(field):
            return torch.from_numpy(np.ascontiguousarray(grid.expand(field))).to(device)

        scale, zero, offset = expanded(grid.scale), expanded(grid.zero), expanded(grid.offset)
        position = torch.where(scale > 0, (weight + offset) / torch.where(scale > 0, scale, 1.0) + zero, zero)
        floor = torch.floor(position)
        frac = (position - floor).clamp(1e-6, 1 - 1e-6)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("offset", offset)
        self.register_buffer("searched", torch.from_numpy(grid.codes.copy()).to(device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(device).float())
        self.v = nn.Parameter(-torch.log((reference.ZETA - reference.GAMMA) / (frac - reference.GAMMA) - 1.0))
        self.rounding = Rounding.SOFT

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        return self.scale * (codes - self.zero) - self.offset

    def forward(self, x):
        if self.rounding is Rounding.SOFT:
            codes = torch.clamp(self.floor + reference.rectified_sigmoid(self.v), 0.0, float(self.qmax))
        else:
            codes = (self.hard_codes() if self.rounding is Rounding.LEARNED else self.searched).float()
        w = self._values(codes)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return ops.rounding_loss(self.v, beta)

    def hard_codes(self) -> torch.Tensor:
        up = (reference.rectified_sigmoid(self.v.detach()) >= 0.5).float()
        return torch.clamp(self.floor + up, 0, self.qmax).to(torch.uint8)

    def result(self) -> torch.Tensor:
        """The learned codes, uint8 ``[out, in]`` on the CPU."""
        return self.hard_codes().cpu()
