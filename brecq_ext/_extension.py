"""Loading of the compiled kernel modules, once, with one clear warning when they are missing."""
from __future__ import annotations

import functools
import importlib
import logging
import warnings

log = logging.getLogger("brecq_ext")


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """The compiled CPU module, or None (then every op runs its PyTorch reference)."""
    try:
        _C = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        message = (
            "brecq_ext: the compiled CPU kernels are not available "
            f"({exc}); every op falls back to its pure-PyTorch reference, which is correct but "
            "much slower and uses more memory. Reinstall with `pip install .` to build them."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None
    log.debug("brecq_ext CPU kernels loaded (ISA %s)", _C.active_isa())
    return _C


@functools.lru_cache(maxsize=None)
def cuda_kernels():
    """The compiled CUDA module, or None (not built, or no CUDA device)."""
    try:
        _cuda = importlib.import_module(f"{__package__}._cuda")
    except ImportError as exc:
        log.info("brecq_ext CUDA kernels not available (%s); CUDA tensors use the reference", exc)
        return None
    return _cuda


def cpu_isa() -> str:
    """Instruction set the CPU kernels use now ('avx512', 'avx2', 'scalar' or 'reference')."""
    kernels = cpu_kernels()
    return kernels.active_isa() if kernels is not None else "reference"


def set_cpu_isa(name: str) -> str:
    """Lower the instruction set of the CPU kernels (for testing each code path); returns it."""
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("set_cpu_isa: the compiled CPU kernels are not available")
    return kernels.set_isa(name)


def detected_cpu_isa() -> str:
    kernels = cpu_kernels()
    return kernels.detected_isa() if kernels is not None else "reference"
