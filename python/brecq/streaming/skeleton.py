"""A model skeleton on the meta device whose weights come from its checkpoint one module at a time:
what streamed quantization holds instead of the model."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from brecq_ext import QuantLinear

from .safetensors_io import SafetensorsFile, ShardedCheckpoint, TensorEntry

log = logging.getLogger("brecq")


def skeleton_from_folder(path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of a Hugging Face folder, built on the meta device (no memory for weights), in
    ``dtype``, with its rotary embeddings (computed, not stored) on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io import _reset_rotary

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _reset_rotary(model)
    model.tie_weights()
    return model.eval()


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # glibc only
        except (OSError, AttributeError):  # not glibc: nothing to tune
            _LIBC = False
    return _LIBC


def release_free_memory() -> None:
    """Hand memory the allocator holds but no tensor uses back to the system (glibc's
    ``malloc_trim``). Freed blocks of a few MB are kept in the heap once glibc has raised its
    mmap threshold, so without this the resident size of a streamed run creeps up block by block."""
    if _libc():
        _LIBC.malloc_trim(0)


_MMAP_THRESHOLD = -3  # glibc's M_MMAP_THRESHOLD
_HEAP_BOUNDED_AT = 1 << 20


def bound_heap_retention() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the system the
    moment it is freed, for the rest of the process (glibc; elsewhere nothing changes).

    By default glibc raises its mmap threshold to the size of each large block freed (up to
    32 MiB), after which a block's weights, gradients and activations come from the heap, and
    the heap keeps them resident after they are freed: on a streamed run of 16 MB blocks this cost
    about 80 MB of peak (bench/streamed_quantize.py). A fixed threshold also turns that growth
    off. The cost is a page fault per 4 KiB of each new large tensor, small beside the matmuls
    that fill it."""
    if _libc() and _LIBC.mallopt(_MMAP_THRESHOLD, _HEAP_BOUNDED_AT) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the heap keeps its default behaviour")


_LIBC = None


class StreamedWeights:
    """Reads the weights of ``model``, a skeleton on the meta device, from ``source`` module by
    module (:meth:`load`), and gives their memory back (:meth:`release`)."""

    def __init__(self, model: nn.Module, source: ShardedCheckpoint):
        self.model, self.source = model, source
        groups: dict[int, list[str]] = {}
        for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            groups.setdefault(id(tensor), []).append(name)
        # Tied tensors are stored under one of their names; any of them finds it.
        self._stored: dict[str, str | None] = {}
        for names in groups.values():
            stored = next((n for n in names if n in source), None)
            for n in names:
                self._stored[n] = n if n in source else stored

    def stored_name(self, name: str) -> str:
        stored = self._stored.get(name, name if name in self.source else None)
        if stored is None:
            raise KeyError(f"{self.source.folder}: the checkpoint has no tensor {name!r} (nor a tied one); is it a "
                           "checkpoint of this architecture?")
        return stored

    def read(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Tensor ``name`` of the model, in slabs of rows, converted to ``dtype``."""
        return self.source.slabs(self.stored_name(name), dtype)

    @torch.no_grad()
    def load(self, module_name: str) -> nn.Module:
        """Give the submodule ``module_name`` CPU memory and its weights from the checkpoint."""
        module = self.model.get_submodule(module_name)
        transient = [f"{n}.{b}" for n, m in module.named_modules() for b in m._non_persistent_buffers_set
                     if m._buffers.get(b) is not None and m._buffers[b].is_meta]
        if transient:
            raise ValueError(f"{module_name}: buffers {transient[:3]} are computed at construction, not stored; "
                             "streamed loading cannot rebuild them")
        module.to_empty(device="cpu")
        prefix = f"{module_name}." if module_name else ""
        for key, tensor in module.state_dict(keep_vars=True).items():
            stored = self.stored_name(prefix + key)
            info = self.source.info(stored)
            if tuple(info.shape) != tuple(tensor.shape):
                raise ValueError(f"{self.source.folder}: {stored} has shape {list(info.shape)}, the model's "
                                 f"{prefix + key} needs {list(tensor.shape)}")
            self.source.read_into(stored, tensor)
        return module

    def release(self, module_name: str) -> None:
        """Hand the memory of submodule ``module_name`` back (its tensors go to the meta device)."""
        self.model.get_submodule(module_name).to_empty(device="meta")
        release_free_memory()


    @torch.no_grad()
    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of token ids ``[N, T]``, ``[N, T, D]`` in the model's dtype, read
        from the checkpoint a slab of rows at a time (never the whole table)."""
        embedding = self.model.get_input_embeddings()
        name = next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is embedding.weight)
        vocab, dim = embedding.weight.shape
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"calibration: token ids must be in [0, {vocab}) for this model, got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        out = torch.empty(*ids.shape, dim, dtype=embedding.weight.dtype)
        first = 0
        for slab in self.read(name, embedding.weight.dtype):
            inside = (ids >= first) & (ids < first + slab.shape[0])
            out[inside] = slab[ids[inside] - first]
            first += slab.shape[0]
        return out

    def named_contents(self) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        """Every entry of the model's state dict with its contents, as the in-memory model would
        hold them: what fingerprints a run."""
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            yield name, self.read(name, tensor.dtype)


def streamed_entries(model: nn.Module, weights: StreamedWeights,
                     locate: Callable[[str], tuple[Path, str]]) -> list[TensorEntry]:
    """The tensors of a streamed-quantized model to save, in the form ``save_quantized`` takes:
    packed layers from the checkpoint files ``locate(layer name)`` names (file and the layer's name
    in it), everything else from the source checkpoint, converted to the skeleton's dtype."""
    from ..io import duplicate_names

    skip = duplicate_names(model)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        owner, _, key = name.rpartition(".")
        if owner in quantized:
            file, stored_layer = locate(owner)

            def chunks(file=file, stored=f"{stored_layer}.{key}"):
                return [SafetensorsFile(file).read(stored)]
        else:
            def chunks(name=name, dtype=tensor.dtype):
                return weights.read(name, dtype)
        entries.append(TensorEntry(name, tensor.dtype, tuple(tensor.shape), chunks))
    return entries
