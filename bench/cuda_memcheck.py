"""Every CUDA op once on small, odd shapes (rows that are not multiples of a warp, in_features that
are not multiples of the group size), for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 bench/cuda_memcheck.py

Out-of-bounds reads that happen to return harmless values pass the tests; memcheck sees them.
"""
from __future__ import annotations

import torch

from brecq_ext import ops


def each_gemv_kernel(x, packed, scale, zero, bits, group_size) -> None:
    """The decode kernels the op does not pick by default, called by name (brecq::cuda::GemvKernel)."""
    cuda = ops.cuda_kernels()
    dtype = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    m, k, n = x.shape[0], x.shape[1], packed.shape[0]
    y = torch.empty(m, n, device="cuda", dtype=x.dtype)
    for kernel, tuning in ((1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)):  # each tuning of mma16 too
        if cuda.packed_gemv_supported(x.data_ptr(), packed.data_ptr(), dtype, bits, group_size, m, k, x.stride(0),
                                      kernel):
            cuda.packed_gemv(x.data_ptr(), dtype, m, x.stride(0), packed.data_ptr(), scale.data_ptr(),
                             zero.data_ptr(), 0, n, k, bits, group_size, y.data_ptr(),
                             torch.cuda.current_stream().cuda_stream, kernel, tuning)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits, group_size, n, k in [(4, 64, 13, 172), (6, 64, 9, 1000), (3, 32, 5, 96), (8, 128, 3, 300)]:
        w = (torch.randn(n, k, generator=gen) * 0.05).cuda()
        scale, zero = ops.quant_params(w, bits, group_size, 20)
        codes = ops.quantize(w, scale, zero, bits, group_size)
        ops.dequantize(codes, scale, zero, group_size)
        ops.fake_quantize(w, scale, zero, bits, group_size)
        packed = ops.pack(codes, bits, group_size)
        assert torch.equal(ops.unpack(packed, bits, group_size, k), codes)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ops.dequantize_packed(packed, scale, zero, bits, group_size, k, dtype)
            for rows in (1, 3, 9, 16, 17):
                x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
                ops.packed_matmul(x, packed, scale, zero, None, bits, group_size, k)
                each_gemv_kernel(x, packed, scale, zero, bits, group_size)
        v = torch.randn(n, k, generator=gen).cuda()
        ops.adaround_forward(w, v, scale, zero, bits, group_size)
        ops.adaround_backward(torch.randn_like(w), w, v, scale, zero, bits, group_size)
        ops.adaround_regularizer(v, 12.0)
    torch.cuda.synchronize()
    print("cuda_memcheck: all ops ran")


if __name__ == "__main__":
    main()
