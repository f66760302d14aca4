import pytest
import torch

from brecq_ext import ops, reference as ref

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _layer(out_features, in_features, bits, group_size, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size)
    codes = ops.quantize(w, scale, zero, bits, group_size)
    packed = ops.pack(codes, bits, group_size)
    bias = torch.randn(out_features, generator=gen)
    w_deq = ref.dequantize(codes, scale, zero, group_size)
    return [t.to(device) for t in (packed, scale, zero, bias, w_deq)]


def assert_matmul_close(y, x, w_deq, bias):
    """Compare with the float64 product; the bound scales with sum |x| |w| so that it is tight for
    every output and any pairing error between codes and inputs is caught."""
    exact = x.double() @ w_deq.double().t()
    if bias is not None:
        exact = exact + bias.double()
    magnitude = x.double().abs() @ w_deq.double().abs().t() + (bias.double().abs() if bias is not None else 0)
    # float32 accumulation; bfloat16/float16 outputs add one rounding of the result.
    rel = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 2e-3}[y.dtype]
    err = (y.double() - exact).abs()
    worst = (err / (magnitude + 1e-30)).max().item()
    assert worst <= rel, f"max error {worst:.3g} of sum |x||w| exceeds {rel:g}"


@pytest.mark.parametrize("out_features", [1, 17, 1024], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("in_features", [64, 96, 172, 1000, 1024, 3072], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("rows", [1, 3, 7, 64, 511], ids=lambda m: f"m{m}")
def test_shapes_w4_g64_float32(rows, in_features, out_features):
    packed, scale, zero, bias, w_deq = _layer(out_features, in_features, 4, 64, seed=rows + in_features)
    x = torch.randn(rows, in_features)
    y = ops.packed_matmul(x, packed, scale, zero, bias, 4, 64, in_features)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    assert_matmul_close(y, x, w_deq, bias)


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [32, 48, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 33], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("in_features", [172, 1000], ids=lambda k: f"k{k}")
def test_every_code_path_against_reference(isa, dtype, bits, group_size, rows, in_features):
    packed, scale, zero, bias, w_deq = _layer(19, in_features, bits, group_size, seed=bits * 31 + rows)
    x = torch.randn(rows, in_features).to(dtype)
    y = ops.packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    assert y.dtype == dtype
    assert_matmul_close(y, x.float(), w_deq, bias)
    y_ref = ref.packed_matmul(x, packed, scale, zero, bias, bits, group_size, in_features)
    assert y.shape == y_ref.shape


@pytest.mark.parametrize("rows", [1, 6, 40], ids=lambda m: f"m{m}")
def test_non_contiguous_and_batched_inputs(isa, rows):
    packed, scale, zero, bias, w_deq = _layer(23, 192, 6, 64, seed=rows)
    x_t = torch.randn(192, rows).t()  # column-major rows
    x_strided = torch.randn(rows, 384)[:, ::2]  # every other element
    x_batched = torch.randn(2, rows, 192)
    for x in (x_t, x_strided):
        assert rows == 1 or not x.is_contiguous()  # a single row is contiguous either way
        y = ops.packed_matmul(x, packed, scale, zero, bias, 6, 64, 192)
        assert_matmul_close(y, x, w_deq, bias)
    y = ops.packed_matmul(x_batched, packed, scale, zero, None, 6, 64, 192)
    assert y.shape == (2, rows, 23)
    assert_matmul_close(y.reshape(-1, 23), x_batched.reshape(-1, 192), w_deq, None)


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bits", [4, 6, 3], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("rows", [1, 5, 16, 64], ids=lambda m: f"m{m}")
def test_device_path_matches_dense_product(device, rows, bits, dtype):
    packed, scale, zero, bias, w_deq = _layer(40, 300, bits, 64, seed=rows, device=device)
    x = torch.randn(rows, 300, device=device).to(dtype)
    y = ops.packed_matmul(x, packed, scale, zero, bias, bits, 64, 300)
    assert y.dtype == dtype and y.device == x.device
    assert_matmul_close(y.cpu(), x.cpu().float(), w_deq.cpu(), bias.cpu())


def test_zero_rows_give_empty_output():
    packed, scale, zero, bias, _ = _layer(8, 64, 4, 64, seed=0)
    y = ops.packed_matmul(torch.empty(0, 64), packed, scale, zero, bias, 4, 64, 64)
    assert y.shape == (0, 8)


def test_gradient_with_respect_to_input_and_bias():
    packed, scale, zero, bias, w_deq = _layer(12, 100, 4, 32, seed=4)
    x = torch.randn(3, 100, requires_grad=True)
    b = bias.clone().requires_grad_(True)
    ops.packed_matmul(x, packed, scale, zero, b, 4, 32, 100).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.clone().requires_grad_(True)
    (x2 @ w_deq.t() + b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_matmul_refuses_bad_arguments():
    packed, scale, zero, bias, _ = _layer(8, 64, 4, 64, seed=0)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        ops.packed_matmul(torch.randn(2, 63), packed, scale, zero, bias, 4, 64, 64)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.packed_matmul(torch.ones(2, 64, dtype=torch.int32), packed, scale, zero, bias, 4, 64, 64)
    with pytest.raises(ValueError, match=r"packed must have shape \(8, 48\)"):
        ops.packed_matmul(torch.randn(2, 64), packed, scale, zero, bias, 6, 64, 64)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.packed_matmul(torch.randn(2, 64), packed, scale, zero, bias[:4], 4, 64, 64)
    with pytest.raises(ValueError, match="bits must be an integer"):
        ops.packed_matmul(torch.randn(2, 64), packed, scale, zero, bias, 9, 64, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gemm_workspace_is_reused_per_thread_and_never_leaks_into_results(dtype):
    import threading

    # A wide layer (a multi-megabyte workspace) and a small one, by turns, in and out of
    # inference mode: the reused buffer must give every call the result of the first one.
    layers = [_layer(3072, 1024, 4, 64, seed=1), _layer(100, 172, 6, 32, seed=2)]
    inputs = [torch.randn(32, k, generator=torch.Generator().manual_seed(k)).to(dtype) for k in (1024, 172)]
    group_sizes, bits = (64, 32), (4, 6)

    def run(i):
        packed, scale, zero, bias, _ = layers[i]
        return ops.packed_matmul(inputs[i], packed, scale, zero, bias, bits[i], group_sizes[i], inputs[i].shape[1])

    first = [run(0), run(1)]
    for i, (layer, x) in enumerate(zip(layers, inputs)):
        assert_matmul_close(first[i], x.float() if dtype == torch.float32 else x, layer[4], layer[3])
    compute = ops.matmul._gemm_dtype(inputs[0])  # bfloat16 multiplies in float32 without AVX512_BF16
    workspace = ops.matmul._thread_workspaces.by_dtype[compute]
    for round_ in range(3):
        with torch.inference_mode(round_ % 2 == 0):
            for i in (1, 0):
                assert torch.equal(run(i), first[i])
    assert ops.matmul._thread_workspaces.by_dtype[compute] is workspace  # grown once, then reused
    assert not any(y.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr() for y in first)

    results, errors = {}, []

    def worker(name, i):
        try:
            results[name] = [run(i) for _ in range(4)]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{j}", j % 2)) for j in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for j in range(4):
        assert all(torch.equal(y, first[j % 2]) for y in results[f"t{j}"])


@pytest.mark.parametrize("hardware_bf16", [True, False], ids=["bf16-products", "no-bf16-products"])
def test_bfloat16_gemm_multiplies_in_float32_where_the_cpu_has_no_bf16_products(monkeypatch, hardware_bf16):
    # Without AVX512_BF16 torch's bfloat16 matmul is several times slower than float32, so the GEMM
    # path (more rows than the GEMV kernels take) multiplies in float32 there; both forms must give
    # the product, in bfloat16.
    monkeypatch.setattr(ops.matmul, "_cpu_has_bf16_products", lambda: hardware_bf16)
    packed, scale, zero, bias, w_deq = _layer(300, 1000, 4, 64, seed=3)
    x = torch.randn(40, 1000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert ops.matmul._gemm_dtype(x) == (torch.bfloat16 if hardware_bf16 else torch.float32)
    y = ops.packed_matmul(x, packed, scale, zero, bias, 4, 64, 1000)
    assert y.dtype == torch.bfloat16
    assert_matmul_close(y, x.float(), w_deq, bias)
    assert ops.matmul._thread_workspaces.by_dtype[ops.matmul._gemm_dtype(x)].numel() >= 300 * 1000
