"""Fidelity of a quantized model to its full-precision parent on the same text: mean KL divergence
KL(P_parent || P_quantized) of next-token distributions, and top-1 agreement."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FidelityResult:
    tokens: int
    mean_kl: float  # nats per token
    top1_agreement: float
    window: int
    window_kl: tuple[float, ...] = ()  # mean KL of each window, in stream order (for paired comparisons)


@torch.no_grad()
def fidelity(model, reference, ids: torch.Tensor, window: int = 256, batch_size: int = 8) -> FidelityResult:
    """Compare ``model`` with ``reference`` on token ids [L] in non-overlapping windows."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"fidelity: ids must be a 1-D stream of at least 2 tokens, got {tuple(ids.shape)}")
    windows = [ids[s:s + window] for s in range(0, ids.numel() - 1, window)]
    by_length: dict[int, list[int]] = {}
    for index, w in enumerate(windows):
        by_length.setdefault(len(w), []).append(index)
    kl_sum, agree, count = 0.0, 0, 0
    window_kl = [0.0] * len(windows)
    for group in by_length.values():
        for b in range(0, len(group), batch_size):
            indices = group[b:b + batch_size]
            batch = torch.stack([windows[i] for i in indices])
            p = F.log_softmax(reference(batch.to(next(reference.parameters()).device)).logits.float(), -1).cpu()
            q = F.log_softmax(model(batch.to(next(model.parameters()).device)).logits.float(), -1).cpu()
            kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
            for row, index in enumerate(indices):
                window_kl[index] = kl[row].mean().item()
            kl_sum += kl.sum().item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
            count += batch.numel()
    return FidelityResult(count, kl_sum / count, agree / count, window, tuple(window_kl))
