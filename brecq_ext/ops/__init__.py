"""The kernel library's operators, declared once as torch custom ops (``torch.ops.brecq.*``).

Each op has a schema and a fake (meta) implementation here, a CPU implementation in the compiled
module (``brecq_ext._C``, raw pointers, no libtorch), and a default implementation for every other
device that is the pure-PyTorch reference (CUDA kernels replace it op by op). Arguments are checked
in both the real and the fake implementation, so bad input fails with a clear message under
``torch.compile`` too.

Tensor layouts are those of docs/FORMAT.md: weights ``[out_features, in_features]``, per-group
``scale`` float16 and ``zero`` uint8 ``[out_features, ceil(in_features / group_size)]``.

One module per family of ops, each op's schema, fake, CPU and CUDA implementations together:

* :mod:`.quantizer` — quantization parameters, quantize, dequantize, fake-quantize (``Clipping``);
* :mod:`.rounding` — AdaRound's soft rounding, its gradient and its regularizer;
* :mod:`.packing` — pack, unpack and dense weights from packed ones;
* :mod:`.matmul` — the packed matmul on row-major weights and ``linear``, the module fast path;
* :mod:`.tile16` — the packed matmul on TILE16 weights and ``tile16_linear``.
"""
from __future__ import annotations

from .._extension import cpu_kernels, cuda_kernels  # noqa: F401  (ops.cuda_kernels: the bench scripts call it)
from .matmul import GEMV_MAX_ROWS, linear, packed_matmul
from .packing import dequantize_packed, pack, unpack
from .quantizer import Clipping, dequantize, fake_quantize, quant_params, quantize
from .rounding import adaround_backward, adaround_forward, adaround_regularizer, rounding_loss
from .tile16 import tile16_linear, tile16_matmul

# Import-time probe: a missing compiled module is reported once, when the ops are first loaded.
cpu_kernels()

__all__ = [
    "Clipping", "quant_params", "quantize", "dequantize", "fake_quantize", "adaround_forward",
    "adaround_backward", "adaround_regularizer", "rounding_loss", "pack", "unpack",
    "dequantize_packed", "packed_matmul", "linear", "tile16_matmul", "tile16_linear", "GEMV_MAX_ROWS",
]
