import pytest
import torch

from brecq_ext import ops, reference as ref


def _setup(rows, cols, bits, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    scale, zero = ops.quant_params(w, bits, group_size)
    v = torch.randn(rows, cols, generator=gen) * 3  # spans the clamped and the smooth region of h
    return w, v, scale, zero


SHAPES = [(1, 64), (17, 96), (3, 172), (9, 1000)]


@pytest.mark.parametrize("bits", [2, 4, 6, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_soft_rounding_forward_and_backward_match_reference_autograd(bits, group_size, shape, device):
    w, v, scale, zero = (t.to(device) for t in _setup(*shape, bits, group_size, seed=bits + shape[1]))
    v_kernel = v.clone().requires_grad_(True)
    out = ops.adaround_forward(w, v_kernel, scale, zero, bits, group_size)
    v_ref = v.clone().requires_grad_(True)
    out_ref = ref.adaround_forward(w, v_ref, scale, zero, bits, group_size)
    step = ref._expand(scale.float(), group_size, shape[1])
    # sigmoid may differ by an ulp between libm and torch; the result is within 1e-6 of a step.
    assert torch.all((out - out_ref).abs() <= 1e-6 * step + 1e-7)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    out_ref.backward(upstream)
    assert torch.allclose(v_kernel.grad, v_ref.grad, rtol=1e-5, atol=1e-7 * step.max().item())
    assert (v_kernel.grad != 0).any()


@pytest.mark.parametrize("beta", [20.0, 8.0, 2.0], ids=lambda b: f"beta{b:g}")
def test_regularizer_value_and_gradient_match_reference(beta, device):
    _, v, _, _ = _setup(33, 172, 4, 64, seed=11)
    v = v.to(device)
    v_kernel = v.clone().requires_grad_(True)
    loss = ops.rounding_loss(v_kernel, beta)
    v_ref = v.clone().requires_grad_(True)
    loss_ref = ref.adaround_regularizer(v_ref, beta)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    (2.5 * loss).backward()
    (2.5 * loss_ref).backward()
    assert torch.allclose(v_kernel.grad, v_ref.grad, rtol=1e-4, atol=1e-6)


def test_fused_regularizer_returns_loss_and_gradient_together():
    _, v, _, _ = _setup(5, 64, 4, 64, seed=2)
    loss, grad = ops.adaround_regularizer(v, 10.0)
    v_ref = v.clone().requires_grad_(True)
    ref.adaround_regularizer(v_ref, 10.0).backward()
    assert torch.allclose(grad, v_ref.grad, rtol=1e-4, atol=1e-6)


def test_initial_v_reproduces_the_fractional_part_and_hardens_to_nearest():
    w, _, scale, zero = _setup(17, 172, 4, 64, seed=5)
    v = ref.adaround_init(w, scale, 64)
    x = w / ref._expand(scale.float(), 64, 172)
    assert torch.allclose(ref.rectified_sigmoid(v), x - torch.floor(x), atol=1e-5)
    # Soft weight at init equals the original weight wherever w / scale + zero lies in [0, qmax].
    soft = ops.adaround_forward(w, v, scale, zero, 4, 64)
    shifted = x + ref._expand(zero.float(), 64, 172)
    inside = (shifted >= 0) & (shifted <= 15)
    assert inside.float().mean() > 0.9
    assert torch.allclose(soft[inside], w[inside], atol=1e-5 * scale.float().max().item())
    # Hard rounding of the initial V is round-to-nearest.
    assert torch.equal(ref.adaround_harden(w, v, scale, zero, 4, 64), ops.quantize(w, scale, zero, 4, 64))


def test_adaround_refuses_mismatched_v():
    w, v, scale, zero = _setup(4, 64, 4, 64, seed=1)
    with pytest.raises(ValueError, match=r"v must have shape \(4, 64\)"):
        ops.adaround_forward(w, v[:, :32], scale, zero, 4, 64)
    with pytest.raises(ValueError, match="beta must be positive"):
        ops.adaround_regularizer(v, 0.0)
