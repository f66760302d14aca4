"""One memory region, on 2 MiB pages where the OS allows, for the packed weights of a whole model.

A decode step reads every layer's weights once, layer after layer, a few hundred KiB to a few MiB
at a time. Read as separate allocations on 4 KiB pages, each page costs a TLB miss (a two-level
walk under a hypervisor), and the hardware prefetchers start over at every page boundary; both
weigh most when memory is fast. What this gained on the development VM, and when it gained
nothing, is in docs/CPU.md ("Memory: one region on huge pages").

:func:`gather_quantized_weights` copies every CPU ``QuantLinear``'s buffers, in module order (a
decoder's execution order), into one region and makes the layers' buffers views into it. The
layers behave as before: state dicts hand out tensors of their own, a move to another device or
layout copies the buffers out, and ``load_state_dict`` writes into the region. The region lives as
long as any of its views.

Huge pages are requested with ``madvise(MADV_HUGEPAGE)`` before the region is first written, which
is what Linux's default ``transparent_hugepage=madvise`` setting needs. Elsewhere, or when the
kernel has no huge page to give, the region is ordinary memory: still one allocation in reading
order. :meth:`WeightArena.huge_page_bytes` tells what the OS really gave.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger("brecq_ext")

HUGE_PAGE_BYTES = 2 << 20
# Each tensor starts on a cache line of its own (the kernels' 64-byte loads then never split one
# line between two tensors).
TENSOR_ALIGNMENT = 64
_MADV_HUGEPAGE = 14  # linux/mman.h


@dataclass(frozen=True)
class WeightArena:
    """A uint8 region holding tensors back to back. ``region`` is ``[nbytes]`` uint8 on the CPU,
    starting on a 2 MiB boundary; ``layers`` names what :func:`gather_quantized_weights` moved
    into it (empty for :func:`place_tensors`)."""

    region: Tensor
    layers: tuple[str, ...]
    huge_pages_requested: bool

    @property
    def nbytes(self) -> int:
        return self.region.numel()

    def huge_page_bytes(self) -> int | None:
        """Bytes of the region the OS backs with huge pages now (``AnonHugePages`` of the
        mappings it spans, in /proc/self/smaps), or None where that is not readable."""
        return _huge_page_bytes(self.region.data_ptr(), self.nbytes)


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _new_region(nbytes: int, huge_pages: bool) -> tuple[Tensor, bool]:
    """An uninitialised uint8 CPU tensor of ``nbytes`` starting on a 2 MiB boundary, advised for
    huge pages before any page is touched; and whether the advice was taken."""
    padded = _aligned(max(nbytes, 1), HUGE_PAGE_BYTES)
    raw = torch.empty(padded + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE_BYTES
    region = raw[start:start + nbytes]
    advised = False
    madvise = _madvise() if huge_pages else None
    if madvise is not None:
        advised = madvise(raw.data_ptr() + start, padded, _MADV_HUGEPAGE) == 0
        if not advised:
            log.info("madvise(MADV_HUGEPAGE) refused (errno %d); the weight arena uses ordinary pages",
                     ctypes.get_errno())
    return region, advised


def _huge_page_bytes(start: int, nbytes: int) -> int | None:
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low < start + nbytes and start < high
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def _offsets(tensors: Sequence[Tensor]) -> tuple[list[int], int]:
    """Byte offset of each tensor placed back to back on 64-byte boundaries, and the end."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(_aligned(end, TENSOR_ALIGNMENT))
        end = offsets[-1] + t.numel() * t.element_size()
    return offsets, end


def _copy_into(region: Tensor, offset: int, t: Tensor) -> Tensor:
    view = region[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    view.copy_(t)
    return view


def is_view_of_larger_storage(t: Tensor) -> bool:
    """``t`` covers only part of its storage, as a layer's buffer in a shared region does."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def place_tensors(tensors: Sequence[Tensor], huge_pages: bool = True) -> tuple[WeightArena, list[Tensor]]:
    """Copies of CPU ``tensors`` (any dtypes; made contiguous), back to back in one new region,
    each on a 64-byte boundary. Returns the region and the copies, views into it, in order."""
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.device.type != "cpu":
            raise ValueError(f"place_tensors: tensors[{i}] must be a CPU tensor, got "
                             f"{t.device if isinstance(t, Tensor) else type(t).__name__}")
    offsets, end = _offsets(tensors)
    region, advised = _new_region(end, huge_pages)
    return WeightArena(region, (), advised), [_copy_into(region, o, t) for t, o in zip(tensors, offsets)]


def gather_quantized_weights(model: nn.Module, huge_pages: bool = True) -> WeightArena | None:
    """Move the buffers of every ``QuantLinear`` of ``model`` on the CPU into one region (see the
    module docstring), in module order; returns it, or None when there is no such layer. Layers
    already in a region are moved into the new one. The old buffers are freed as each layer moves
    (unless referenced elsewhere), so the peak is about one model's weights plus one layer."""
    from .quant_linear import QuantLinear

    names, layers, tensors = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.packed.device.type == "cpu":
            buffers = [(key, t) for key, t in module._buffers.items() if t is not None]
            names.append(name)
            layers.append((module, [key for key, _ in buffers]))
            tensors.extend(t for _, t in buffers)
    if not layers:
        return None
    offsets, end = _offsets(tensors)
    region, advised = _new_region(end, huge_pages)
    at = 0
    for module, keys in layers:
        for key in keys:
            module._buffers[key] = _copy_into(region, offsets[at], tensors[at])
            tensors[at] = None  # the list's reference: with the module's gone, the old buffer is freed
            at += 1
        module._checked_buffers = None
    arena = WeightArena(region, tuple(names), advised)
    log.info("gathered %d QuantLinear layers (%.1f MiB) into one region%s", len(names), end / 2**20,
             ", huge pages requested" if advised else "")
    return arena


__all__ = ["HUGE_PAGE_BYTES", "TENSOR_ALIGNMENT", "WeightArena", "gather_quantized_weights", "place_tensors"]
