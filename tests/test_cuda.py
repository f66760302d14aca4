"""What only a GPU shows: the CUDA module is really used, its kernels agree with the CPU kernels bit
for bit where the formulas allow it, the decode GEMV is right at the real Qwen3-0.6B shapes, and
the ops work under CUDA graph capture and torch.compile. The CPU half of the compile test runs
everywhere."""
import functools

import pytest
import torch
from torch import nn

from brecq_ext import QuantLinear, ops
from brecq_ext._extension import cuda_kernels

from test_matmul import _layer, assert_matmul_close

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_cuda_kernels_are_built_and_loaded():
    # Without the module every CUDA op would silently run the PyTorch reference and every other
    # CUDA test would compare the reference with itself.
    assert cuda_kernels() is not None, "brecq_ext._cuda is missing: build with nvcc (BRECQ_CUDA=1)"


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", [(1, 64), (17, 172), (64, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("search_steps", [0, 80], ids=["minmax", "mse"])
def test_cuda_params_equal_cpu_kernel_bit_for_bit(bits, group_size, shape, search_steps):
    # Both kernels sum each group's squared error in the same order without fused multiply-adds,
    # so even the MSE search must pick the same shrink factor everywhere.
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits * 7 + shape[1])) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size, search_steps)
    scale_cuda, zero_cuda = ops.quant_params(w.cuda(), bits, group_size, search_steps)
    assert torch.equal(scale_cuda.cpu(), scale) and torch.equal(zero_cuda.cpu(), zero)


@needs_cuda
@pytest.mark.parametrize("bits", [4, 6], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 4, 16, 17], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("shape", [(3072, 1024), (1024, 3072), (2048, 1024)], ids=lambda s: f"{s[1]}to{s[0]}")
def test_gemv_at_qwen3_shapes(bits, rows, shape):
    out_features, in_features = shape
    packed, scale, zero, _, w_deq = _layer(out_features, in_features, bits, 64, seed=rows, device="cuda")
    x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
    y = ops.packed_matmul(x, packed, scale, zero, None, bits, 64, in_features)
    assert_matmul_close(y.cpu(), x.cpu().float(), w_deq.cpu(), None)
    # The QuantLinear eager path (direct kernel call) agrees with the op.
    layer = QuantLinear.from_codes(ops.unpack(packed, bits, 64, in_features), scale, zero, bits, 64)
    assert torch.equal(layer(x), y)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bits", [4, 6], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("shape", [(13, 172, 64), (40, 1000, 128), (7, 256, 64)],
                         ids=lambda s: f"n{s[0]}k{s[1]}g{s[2]}")
def test_tensor_core_gemv_on_odd_shapes_and_strided_rows(dtype, bits, rows, shape):
    # Rows 8 floats apart in a wider buffer keep the tensor-core kernel (16-byte aligned rows);
    # in_features that are not multiples of 64 exercise its zero-filled tail, and n not a
    # multiple of 8 its partial last tile.
    out_features, in_features, group_size = shape
    packed, scale, zero, bias, w_deq = _layer(out_features, in_features, bits, group_size, seed=rows,
                                              device="cuda")
    width = -(-in_features // 8) * 8 + 8
    x = torch.randn(rows, width, device="cuda").to(dtype)[:, :in_features]
    y = ops.packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    assert_matmul_close(y.cpu(), x.cpu().float(), w_deq.cpu(), bias.cpu())


@functools.lru_cache(maxsize=2)
def _cached_cuda_layer(out_features, in_features, bits, group_size):
    return _layer(out_features, in_features, bits, group_size, seed=out_features + bits, device="cuda")


# brecq::cuda::GemvKernel: each decode kernel checked on its own, not only the one `auto` picks,
# and each tuning of the 16-feature kernel (gemv_mma16.cu's Tuning<>).
GEMV_KERNELS = {"simt": 1, "mma8": 2, "mma16": 3}
GEMV_VARIANTS = {"simt": (1, 0), "mma8": (2, 0), **{f"mma16t{t}": (3, t) for t in range(4)}}
OUTPUT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@needs_cuda
@pytest.mark.parametrize("kernel", list(GEMV_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("bits", [4, 6], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("shape", [(13, 172, 64), (40, 1000, 128), (7, 256, 64), (1030, 3072, 64), (40001, 1000, 64)],
                         ids=lambda s: f"n{s[0]}k{s[1]}g{s[2]}")
def test_each_gemv_kernel_matches_the_exact_product(kernel, dtype, bits, rows, shape):
    # Shapes: partial last tiles (n not a multiple of 16), tails of in_features that are not
    # multiples of 64 (zero-filled), warps that split K 8 ways and run several rounds of K blocks
    # (k = 3072), and a layer with tiles enough that warps split K less (n = 40001 on 132 SMs: not at
    # all in mma8 and mma16 tuning 2, 2 ways in tunings 0 and 1, 4 ways in tuning 3).
    cuda = cuda_kernels()
    out_features, in_features, group_size = shape
    packed, scale, zero, bias, w_deq = _cached_cuda_layer(out_features, in_features, bits, group_size)
    # Rows a multiple of 8 elements apart, as the tensor-core kernels need (k = 172 is not).
    width = -(-in_features // 8) * 8
    x = torch.randn(rows, width, device="cuda").to(dtype)[:, :in_features]
    kernel_id, tuning = GEMV_VARIANTS[kernel]
    supported = cuda.packed_gemv_supported(x.data_ptr(), packed.data_ptr(), OUTPUT_TYPE[dtype], bits, group_size,
                                           rows, in_features, x.stride(0), kernel_id)
    assert supported == (kernel == "simt" or dtype != torch.float32), "support rules changed"
    if not supported:
        return
    y = torch.full((rows, out_features), float("nan"), device="cuda", dtype=dtype)
    cuda.packed_gemv(x.data_ptr(), OUTPUT_TYPE[dtype], rows, x.stride(0), packed.data_ptr(), scale.data_ptr(),
                     zero.data_ptr(), bias.float().data_ptr(), out_features, in_features, bits, group_size,
                     y.data_ptr(), torch.cuda.current_stream().cuda_stream, kernel_id, tuning)
    assert_matmul_close(y.cpu(), x.cpu().float(), w_deq.cpu(), bias.cpu())


@needs_cuda
def test_gemv_support_rules_for_strided_rows():
    # Rows that are not 8 elements apart rule out the tensor-core kernels, never the SIMT one.
    cuda = cuda_kernels()
    packed, *_ = _layer(16, 172, 4, 64, seed=0, device="cuda")
    x = torch.randn(3, 172, device="cuda", dtype=torch.bfloat16)
    supported = [cuda.packed_gemv_supported(x.data_ptr(), packed.data_ptr(), 1, 4, 64, 3, 172, 172, kernel)
                 for kernel in GEMV_KERNELS.values()]
    assert supported == [True, False, False]


@pytest.mark.skipif(cuda_kernels() is None, reason="built without nvcc")
def test_gemv_kernel_and_tuning_arguments_are_checked():
    # Checked before anything reaches the GPU, so this runs wherever the module was compiled.
    cuda = cuda_kernels()
    with pytest.raises(ValueError, match="kernel must be"):
        cuda.packed_gemv_supported(0, 0, 1, 4, 64, 1, 64, 64, 7)
    with pytest.raises(ValueError, match="kernel must be"):
        cuda.packed_gemv(0, 1, 1, 64, 0, 0, 0, 0, 16, 64, 4, 64, 0, 0, -1)
    with pytest.raises(ValueError, match="tuning applies to kernel 3"):
        cuda.packed_gemv(0, 1, 1, 64, 0, 0, 0, 0, 16, 64, 4, 64, 0, 0, 2, 1)
    with pytest.raises(ValueError, match="tuning must be 0..3"):
        cuda.packed_gemv(0, 1, 1, 64, 0, 0, 0, 0, 16, 64, 4, 64, 0, 0, 3, 4)


# kAuto's choice at the Qwen3-0.6B shapes on an H100 (132 SMs), as measured in bench/README.md:
# the 16-feature kernel's longest rounds (tuning 2) wherever a layer cannot fill the GPU, the 8-feature
# kernel where its warps need fewer trips to DRAM (W6 o_proj: 4 K blocks a warp, one round of 4
# against rounds of 3), and the most warps (tuning 0) on the lm_head, which streams.
AUTO_CHOICE = {
    # (in, out): {(bits, rows): (kernel, tuning)} for 132 SMs (H100, H200), as the rule picks them
    # from the per-kernel timings in bench/README.md.
    (1024, 2048): {(4, 1): ("mma16", 2), (6, 1): ("mma16", 2), (4, 16): ("mma16", 2), (6, 16): ("mma16", 2)},
    (1024, 1024): {(4, 1): ("mma16", 2), (6, 1): ("mma16", 2), (4, 16): ("mma16", 2), (6, 16): ("mma16", 2)},
    (2048, 1024): {(4, 1): ("mma16", 2), (6, 1): ("mma8", 0), (4, 16): ("mma16", 2), (6, 16): ("mma8", 0)},
    (1024, 3072): {(4, 1): ("mma16", 2), (6, 1): ("mma16", 2), (4, 16): ("mma16", 3), (6, 16): ("mma16", 3)},
    (3072, 1024): {(4, 1): ("mma16", 2), (6, 1): ("mma16", 2), (4, 16): ("mma16", 2), (6, 16): ("mma16", 2)},
    (1024, 151936): {(4, 1): ("mma16", 0), (6, 1): ("mma16", 0), (4, 16): ("mma16", 3), (6, 16): ("mma16", 3)},
}


@pytest.mark.skipif(cuda_kernels() is None, reason="built without nvcc")
@pytest.mark.parametrize("shape", list(AUTO_CHOICE), ids=lambda s: f"{s[0]}to{s[1]}")
def test_auto_gemv_choice_at_qwen3_shapes(shape):
    # Pure host logic: runs without a GPU wherever the CUDA module was compiled (CI builds it).
    names = {value: name for name, value in GEMV_KERNELS.items()}
    in_features, out_features = shape
    for (bits, rows), expected in AUTO_CHOICE[shape].items():
        kernel, tuning = cuda_kernels().gemv_choice(out_features, in_features, 64, bits, rows, 132)
        assert (names[kernel], tuning) == expected, (bits, rows)
    # Without the 16-feature kernel (a group size that is not 64 times a power of two), the 8-feature one.
    assert cuda_kernels().gemv_choice(out_features, in_features, 192, 4, 1, 132, False) == (GEMV_KERNELS["mma8"], 0)


def _quant_model(device, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(192, 256), nn.GELU(), nn.Linear(256, 96))
    quantized = nn.Sequential(QuantLinear.from_linear(model[0], 4, 64), nn.GELU(),
                              QuantLinear.from_linear(model[2], 6, 64))
    return quantized.to(device), dtype


@needs_cuda
@pytest.mark.parametrize("rows", [1, 64], ids=["gemv", "gemm"])
def test_quant_linear_under_cuda_graph_capture(rows):
    model, dtype = _quant_model("cuda", torch.bfloat16)
    static_x = torch.randn(rows, 192, device="cuda", dtype=dtype)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph, as capture requires
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for seed in range(3):
            x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, model(x)), f"replay {seed} differs from eager"


@needs_cuda
def test_adaround_step_under_cuda_graph_capture():
    w = torch.randn(96, 128, device="cuda") * 0.05
    scale, zero = ops.quant_params(w, 4, 64)
    v = torch.zeros_like(w)
    grad = torch.randn_like(w)

    def step():
        soft = ops.adaround_forward(w, v, scale, zero, 4, 64)
        grad_v = ops.adaround_backward(grad, w, v, scale, zero, 4, 64)
        loss, reg_grad = ops.adaround_regularizer(v, 12.0)
        return soft, grad_v, loss, reg_grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    v.copy_(torch.randn_like(v))
    graph.replay()
    torch.cuda.synchronize()
    soft, grad_v, loss, reg_grad = step()
    assert torch.equal(outputs[0], soft) and torch.equal(outputs[1], grad_v) and torch.equal(outputs[3], reg_grad)
    # The loss is summed with atomics across blocks: equal up to the order of the additions.
    assert torch.allclose(outputs[2], loss, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_torch_compile_traces_the_ops_without_graph_breaks(device):
    # fullgraph=True fails on any graph break, so the fake implementations must cover every op on
    # the path. CPU uses the aot_eager backend (no C++ compile in the test); CUDA uses inductor.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, dtype = _quant_model(device, dtype)
    backend = "aot_eager" if device == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(5, 192, device=device, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 4, 40], ids=lambda m: f"m{m}")
def test_packed_weights_at_an_odd_address(rows):
    # A view that starts one byte into its storage: the kernels' wide loads would be misaligned
    # (a sticky CUDA error), so the op must take a path that reads bytes.
    packed, scale, zero, bias, w_deq = _layer(24, 256, 4, 64, seed=1, device="cuda")
    storage = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.data_ptr() % 2 == 1
    x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
    y = ops.packed_matmul(x, shifted, scale, zero, bias, 4, 64, 256)
    assert_matmul_close(y.cpu(), x.cpu().float(), w_deq.cpu(), bias.cpu())
    assert torch.equal(ops.dequantize_packed(shifted, scale, zero, 4, 64, 256), w_deq)
