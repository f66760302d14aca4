"""One call of each tensor-core GEMV kernel on one layer shape, for Nsight Compute:

    ncu --kernel-name regex:gemv_mma --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --launch-skip 5 --launch-count 5 python3 bench/ncu_gemv.py --out 151936 --in 1024

The script calls each kernel twice, all warm-up calls first: --launch-skip 5 --launch-count 5 reads
the second call of each.
"""
from __future__ import annotations

import argparse

import torch

from brecq_ext import ops
from brecq_ext.format import num_groups, packed_row_bytes

KERNELS = {"mma8": (2, 0), **{f"mma16t{t}": (3, t) for t in range(4)}}  # (GemvKernel, mma16 tuning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=151936, dest="out_features")
    parser.add_argument("--in", type=int, default=1024, dest="in_features")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    n, k, bits = args.out_features, args.in_features, args.bits
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, (n, packed_row_bytes(k, 64, bits)), dtype=torch.uint8, device="cuda", generator=gen)
    scale = (torch.rand(n, num_groups(k, 64), device="cuda", generator=gen) * 0.01 + 1e-3).half()
    zero = torch.randint(0, 1 << bits, (n, num_groups(k, 64)), dtype=torch.uint8, device="cuda", generator=gen)
    x = torch.randn(args.rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    y = torch.empty(args.rows, n, device="cuda", dtype=torch.bfloat16)
    cuda = ops.cuda_kernels()
    cuda.use_device(0)
    for kernel in [*KERNELS.values(), *KERNELS.values()]:  # warm-up calls, then the ones to read
        cuda.packed_gemv(x.data_ptr(), 1, args.rows, x.stride(0), packed.data_ptr(), scale.data_ptr(),
                         zero.data_ptr(), 0, n, k, bits, 64, y.data_ptr(), torch.cuda.current_stream().cuda_stream,
                         *kernel)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
