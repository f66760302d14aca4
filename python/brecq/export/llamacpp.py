"""Checking an exported GGUF file in llama.cpp itself (through ``llama-cpp-python``, an optional
dependency): tokenization and next-token logits against brecq's own model."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("brecq")


def open_llama(path, n_ctx: int = 512, n_threads: int = 2, logits_all: bool = True, extra_buffer_types: bool = True):
    """A ``llama_cpp.Llama`` for ``path``, quiet. ``extra_buffer_types=False`` keeps llama.cpp to
    its plain CPU weight layout (no repacking, no AMX): a llama.cpp built with AMX on a CPU that
    reports it crashed in its AMX matmul on the tiny stories260k shapes here (llama-cpp-python
    0.3.36), so checks that need no speed use the plain path."""
    import llama_cpp.llama as llama_module

    if extra_buffer_types:
        return llama_module.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, logits_all=logits_all,
                                  verbose=False)
    default_params = llama_module.llama_cpp.llama_model_default_params

    def plain_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_params
    try:
        return llama_module.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, logits_all=logits_all,
                                  verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params


def llama_quantize(source, out, ftype: int, threads: int = 0, binary=None) -> None:
    """llama.cpp's own quantizer: the GGUF ``source`` to ``out`` as ``ftype`` (a
    ``LLAMA_FTYPE_MOSTLY_*`` value: Q4_0 2, Q4_1 3, Q8_0 7, Q4_K_M 15, Q5_K_M 17, Q6_K 18), through
    ``llama_cpp.llama_model_quantize`` or, with ``binary``, a ``llama-quantize`` executable built
    from a llama.cpp tree (for a llama.cpp built from source without llama-cpp-python)."""
    if binary is None:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed: {source} -> {out} (ftype {ftype})")
        return
    import subprocess

    # llama-quantize takes the LLAMA_FTYPE_MOSTLY_* number as it is, and refuses one it does not know.
    command = [str(binary), str(source), str(out), str(ftype)] + ([str(threads)] if threads > 0 else [])
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {done.returncode}: {done.stderr.strip()[-500:]}")


def llama_tokenize(llm, text: str, add_bos: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    """float32 [len(ids), vocab]: llama.cpp's logits at every position of one sequence."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@dataclass(frozen=True)
class Agreement:
    tokens: int
    top1: float  # share of positions where both pick the same next token
    mean_kl: float  # mean KL(brecq || llama.cpp) per position, nats
    max_kl: float
    # brecq's own top-2 logit margin at the positions where the two pick different tokens: small
    # means the flips are near-ties that llama.cpp's 8-bit activations tip one way or the other.
    max_margin_at_disagreement: float

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "top1": self.top1, "mean_kl": self.mean_kl, "max_kl": self.max_kl,
                "max_margin_at_disagreement": self.max_margin_at_disagreement}


@torch.no_grad()
def compare_logits(model, llm, sequences: list[list[int]]) -> Agreement:
    """Next-token agreement of brecq's ``model`` and llama.cpp's ``llm`` over ``sequences``."""
    kls, same, total, margin = [], 0, 0, 0.0
    for ids in sequences:
        ours = model(torch.tensor([ids])).logits[0].float()
        theirs = llama_logits(llm, ids)
        log_p, log_q = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        differ = ours.argmax(-1) != theirs.argmax(-1)
        same += int((~differ).sum())
        total += len(ids)
        if differ.any():
            top2 = ours[differ].topk(2, -1).values
            margin = max(margin, float((top2[:, 0] - top2[:, 1]).max()))
    kl = torch.cat(kls)
    return Agreement(total, same / total, float(kl.mean()), float(kl.max()), margin)
