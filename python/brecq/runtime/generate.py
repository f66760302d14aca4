"""Text generation through the C++ decode runtime, with transformers' ``generate`` as the fallback.

:func:`generate` takes what ``model.generate`` takes for one sequence (greedy or sampling with
temperature / top-k / top-p, stop tokens, ``max_new_tokens``) and returns the same ``[1, prompt +
new]`` token tensor. A prompt of :data:`HANDOVER_MIN_TOKENS` or more is run by transformers' batched
forward (its matmuls read each weight once for the whole prompt) and its KV cache handed to the
runtime; the tokens after it are one runtime call each.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cpu_decoder import CpuDecoder, cpu_decoder_or_none

log = logging.getLogger("brecq")

#: Prompts at least this long are prefilled by transformers and handed over (shorter ones run in
#: the runtime's chunks of 8 tokens, whose fixed costs are smaller than a transformers forward's).
HANDOVER_MIN_TOKENS = 16


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``do_sample=False``) or sampled from the softmax of
    logits / temperature, restricted to the ``top_k`` most likely tokens (0: all) and then to the
    smallest set whose probability reaches ``top_p`` (1.0: all), as transformers' warpers do."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"Sampling: do_sample must be True or False, got {self.do_sample!r}")
        if not self.temperature > 0:
            raise ValueError(f"Sampling: temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"Sampling: top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p!r}")

    def choose(self, logits: Tensor, generator: torch.Generator | None = None) -> int:
        """The next token from ``[vocab]`` logits."""
        if not self.do_sample:
            return int(torch.argmax(logits))
        scores = logits.float() / self.temperature
        if self.top_k and self.top_k < scores.numel():
            threshold = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
            # Drop a token when the ones before it already reach top_p; the first always stays.
            drop = torch.zeros_like(cumulative, dtype=torch.bool)
            drop[1:] = cumulative[:-1] >= self.top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=generator))


def _stop_ids(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        generation = getattr(model, "generation_config", None)
        eos_token_id = getattr(generation, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _prompt_ids(input_ids) -> Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"generate: input_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"generate: the C++ runtime decodes one sequence; input_ids has a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"generate: input_ids must be [n] or [1, n] with n >= 1, got shape {tuple(ids.shape)}")
    return ids.to(torch.int64).cpu()


@torch.inference_mode()
def prefill(decoder: CpuDecoder, prompt: Tensor) -> Tensor:
    """Runs ``prompt`` ([n] token ids) from an empty cache; returns the last token's logits. Long
    prompts go through transformers' batched forward and its cache is handed over."""
    decoder.reset()
    if prompt.numel() >= HANDOVER_MIN_TOKENS:
        from ..measurement.measure import _cache_of, _last_logits_only

        out = decoder.model(prompt[None], use_cache=True, **_last_logits_only(decoder.model))
        cache = _cache_of(out)
        lengths = {entry.keys.shape[2] for entry in getattr(cache, "layers", [])}
        if lengths == {prompt.numel()}:
            decoder.prefill_from(cache)
            return out.logits[0, -1].float()
        # A sliding-window cache keeps fewer positions than the prompt: the runtime needs them all.
        log.debug("transformers cache lengths %s for a %d-token prompt: prefilling in the runtime", lengths,
                  prompt.numel())
        decoder.reset()
    return decoder.forward(prompt).clone()


@torch.inference_mode()
def generate(model: nn.Module, input_ids, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             seed: int | None = None, decoder: CpuDecoder | None = None, use_runtime: bool = True,
             on_token: Callable[[int], None] | None = None) -> Tensor:
    """Continues ``input_ids`` (one sequence, ``[n]`` or ``[1, n]``) by up to ``max_new_tokens``
    tokens, stopping after a stop token (``eos_token_id``, default: the model's generation config);
    returns ``[1, n + generated]`` like ``model.generate``. ``on_token`` is called with each new
    token as it is chosen (streaming). Runs in the C++ runtime (``decoder``, or one built for
    ``model``); a model it does not support goes through ``model.generate`` with the same settings,
    the reason logged, and so does every model with ``use_runtime=False``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampling = Sampling(do_sample, float(temperature), top_k, float(top_p))
    prompt = _prompt_ids(input_ids)
    stop = _stop_ids(model, eos_token_id)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if use_runtime and decoder is None:
        decoder = cpu_decoder_or_none(model)
    if not use_runtime or decoder is None:
        return _transformers_generate(model, prompt, max_new_tokens, sampling, stop, seed, on_token)
    tokens = prompt.tolist()
    if max_new_tokens == 0:
        return torch.tensor([tokens])
    token = sampling.choose(prefill(decoder, prompt), generator)
    for step in range(max_new_tokens):
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or step == max_new_tokens - 1:
            break
        # Greedy: the runtime picks the token as it finishes the logits (no pass over them here).
        token = (sampling.choose(decoder.forward([token]), generator) if sampling.do_sample
                 else decoder.forward_greedy([token]))
    return torch.tensor([tokens])


def _transformers_generate(model, prompt: Tensor, max_new_tokens: int, sampling: Sampling, stop: set[int],
                           seed: int | None, on_token) -> Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    streamer = None
    if on_token is not None:
        class _Streamer:  # transformers' streamer protocol: put(prompt), put(token)..., end()
            first = True

            def put(self, value):
                if self.first:
                    self.first = False
                    return
                for token in value.reshape(-1).tolist():
                    on_token(int(token))

            def end(self):
                pass

        streamer = _Streamer()
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sampling.do_sample, "streamer": streamer,
                  "eos_token_id": sorted(stop) or None, "pad_token_id": next(iter(stop), 0)}
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    device = next(model.parameters()).device
    return model.generate(prompt[None].to(device), **kwargs).cpu()
