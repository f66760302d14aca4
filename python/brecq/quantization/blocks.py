"""Decoder blocks of supported architectures, and the inputs each block is called with."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("brecq")

# Decoder layers whose forward is `layer(hidden_states, **kwargs) -> hidden_states` with rotary
# position embeddings and the attention mask passed in by the parent model.
SUPPORTED_BLOCKS = ("Qwen3DecoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


class UnsupportedArchitecture(ValueError):
    pass


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (each one block). Refuses architectures it does not know."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: no decoder layers at model.model.layers; block reconstruction "
            f"supports causal LMs built of {', '.join(SUPPORTED_BLOCKS)}")
    kinds = {type(layer).__name__ for layer in layers}
    unknown = kinds - set(SUPPORTED_BLOCKS)
    if unknown:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: decoder layers of type {sorted(unknown)} are not supported; "
            f"supported: {', '.join(SUPPORTED_BLOCKS)}")
    return layers


class _StopForward(Exception):
    pass


@dataclass
class BlockCall:
    """What the parent model passes to every decoder layer besides the hidden states (rotary
    cos/sin, attention mask, position ids), captured once; batch dimension 1, broadcast."""

    kwargs: dict

    def to(self, device) -> BlockCall:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            return v
        return BlockCall({k: move(v) for k, v in self.kwargs.items()})


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor,
                         inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, BlockCall]:
    """Hidden states entering the first block, float32 ``[N, T, D]`` on CPU, for calibration ids
    ``[N, T]``; the model runs one sample at a time and stops at the first block. With
    ``inputs_embeds`` (``[N, T, D]``, the embeddings of ``input_ids``) the model starts from those
    and never touches its embedding table (a skeleton whose weights are elsewhere)."""
    blocks = decoder_blocks(model)
    captured: list[torch.Tensor] = []
    call: dict = {}

    def hook(module, args, kwargs):
        captured.append(args[0].detach().float().cpu())
        if not call:
            call.update({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache",
                                                                       "past_key_value")})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device if inputs_embeds is None else torch.device("cpu")
    try:
        for i, row in enumerate(input_ids):
            try:
                if inputs_embeds is None:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                else:
                    model(inputs_embeds=inputs_embeds[i:i + 1], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    call["use_cache"] = False
    return torch.cat(captured), BlockCall(call)


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device, batch_size: int = 8,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Block outputs for all samples, float32 on CPU, computed ``batch_size`` samples at a time and
    written into ``out`` when given (e.g. a memory-mapped tensor of the same shape as ``hidden``)."""
    call_on_device = call.to(device)
    out = torch.empty_like(hidden, dtype=torch.float32) if out is None else out
    home = next(block.parameters()).device  # the block visits `device` and goes back afterwards
    block.to(device)
    try:
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start:start + batch_size].to(device)
            result = block(x, **call_on_device.kwargs)
            if isinstance(result, tuple):  # older transformers return (hidden_states, ...)
                result = result[0]
            out[start:start + batch_size] = result.float().cpu()
    finally:
        block.to(home)
    return out


class ActivationStore:
    """Where cached block inputs and targets live: CPU memory, or memory-mapped files in a folder
    (for calibration sets larger than memory). Files are removed when released or on close."""

    def __init__(self, folder=None):
        from pathlib import Path

        self.folder = Path(folder) if folder is not None else None
        self._count = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        if self.folder is None:
            return torch.empty_like(like, dtype=torch.float32)
        self._count += 1
        path = self.folder / f"activations_{self._count:04d}.f32"
        tensor = torch.from_file(str(path), shared=True, size=like.numel(), dtype=torch.float32).view(like.shape)
        tensor._brecq_path = path  # released with the tensor
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        path = getattr(tensor, "_brecq_path", None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.folder is not None:
            for path in self.folder.glob("activations_*.f32"):
                path.unlink(missing_ok=True)


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
