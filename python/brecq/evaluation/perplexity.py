"""Perplexity over fixed windows of a token stream.

Windows: the text is tokenized as one stream (see :func:`token_stream`); windows of ``window``
tokens start every ``stride`` tokens; in each window only the tokens not already scored by the
previous window count (all of them when stride == window, the default), each predicted from the
window's preceding tokens. Reports tokens counted, mean negative log-likelihood (nats) and
perplexity = exp(mean NLL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int
    mean_nll: float
    perplexity: float
    window: int
    stride: int
    # Per window, in stream order: tokens scored and their mean NLL, for paired comparisons of two
    # models on the same windows (brecq.evaluation.metrics.paired_bootstrap_difference).
    window_tokens: tuple[int, ...] = ()
    window_nll: tuple[float, ...] = ()


def token_stream(tokenizer, texts) -> torch.Tensor:
    """Documents encoded as the tokenizer does (with its BOS when it adds one) and concatenated;
    EOS separates them only when the tokenizer adds no BOS (llama2.c-style models never saw EOS)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(document_ids(tokenizer, text))
    return torch.tensor(ids, dtype=torch.long)


def document_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    adds_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    if not adds_bos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 256, stride: int | None = None, batch_size: int = 8,
               show_progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on token ids [L] (int64)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"perplexity: need 0 < stride <= window, got stride={stride}, window={window}")
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"perplexity: ids must be a 1-D stream of at least 2 tokens, got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    starts = list(range(0, max(1, ids.numel() - 1), stride))
    total_nll, total_tokens = 0.0, 0
    window_tokens, window_nll = [], []
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch_starts in tqdm(batches, desc="perplexity", disable=not show_progress):
        windows, scored = [], []
        for s in batch_starts:
            chunk = ids[s:s + window]
            # Tokens already predicted by the previous window (overlap) are context only.
            first_new = 0 if s == 0 else window - stride
            windows.append(chunk)
            scored.append(first_new)
        length = max(len(w) for w in windows)
        batch = torch.zeros(len(windows), length, dtype=torch.long)
        mask = torch.zeros(len(windows), length, dtype=torch.long)
        for i, w in enumerate(windows):
            batch[i, :len(w)] = w
            mask[i, :len(w)] = 1
        logits = model(batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:].to(device)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for i, w in enumerate(windows):
            lo = max(scored[i] - 1, 0) if scored[i] > 0 else 0
            # A trailing window shorter than the overlap scores nothing new (hi < lo there: counting
            # hi - lo would subtract tokens from the total).
            hi = max(len(w) - 1, lo)
            window_sum = nll[i, lo:hi].sum().item()
            total_nll += window_sum
            total_tokens += hi - lo
            if hi > lo:
                window_tokens.append(hi - lo)
                window_nll.append(window_sum / (hi - lo))
    mean = total_nll / total_tokens
    return PerplexityResult(total_tokens, mean, math.exp(mean), window, stride, tuple(window_tokens),
                            tuple(window_nll))
