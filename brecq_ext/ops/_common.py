"""What the op families share: the compiled modules' handles, the CUDA stream handed to the CUDA
module, and the integer-argument check put in front of the public ops."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._checks import check_bits, check_group_size
from .._extension import cpu_kernels, cuda_kernels

# The CUDA module's output dtype codes.
_CUDA_OUTPUT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _cpu():
    return cpu_kernels()


def _stream(t: Tensor) -> int:
    """Handle of torch's current stream on t's device, with that device made current for the CUDA
    module (it links its own runtime, whose notion of the current device is separate from torch's)."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    cuda_kernels().use_device(index)
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what inductor calls; fastest
    if raw_stream is not None:
        return raw_stream(index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _integer_arguments(op, qualname: str, **positions: int):
    """``op`` behind a check that its integer arguments are Python ints: torch's schema would refuse
    ``bits=4.0`` with a dispatcher error that names neither the rule nor the range. The torch op
    itself stays ``torch.ops.brecq.*`` (and ``.op`` here); hot decode paths do not go through this."""
    @functools.wraps(op._init_fn)
    def call(*args, **kwargs):
        for name, index in positions.items():
            value = kwargs[name] if name in kwargs else args[index] if index < len(args) else None
            if value is None or (isinstance(value, int) and not isinstance(value, bool)):
                continue
            if name == "bits":
                check_bits(qualname, value)
            if name == "group_size":
                check_group_size(qualname, value)
            raise ValueError(f"{qualname}: {name} must be an integer, got {value!r}")
        return op(*args, **kwargs)

    call.op = op
    return call
