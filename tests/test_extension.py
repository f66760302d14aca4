import subprocess
import sys

import brecq_ext

from conftest import available_isas


def test_isa_can_be_lowered_and_restored():
    detected = brecq_ext.detected_cpu_isa()
    assert detected in ("avx512", "avx512vnni", "avx2", "scalar")
    previous = brecq_ext.cpu_isa()
    try:
        assert brecq_ext.set_cpu_isa("scalar") == "scalar"
        assert brecq_ext.cpu_isa() == "scalar"
        # Raising above what the CPU supports is capped, never obeyed.
        assert brecq_ext.set_cpu_isa("avx512") == detected
    finally:
        brecq_ext.set_cpu_isa(previous)
    assert available_isas()[0] == detected


def test_missing_compiled_module_falls_back_with_one_warning(tmp_path):
    script = (
        "import sys, warnings\n"
        "sys.modules['brecq_ext._C'] = None  # as if the build had produced no module\n"
        "warnings.simplefilter('always')\n"
        "import torch, brecq_ext\n"
        "from brecq_ext import ops\n"
        "w = torch.randn(8, 64); s, z = ops.quant_params(w, 4, 64)\n"
        "p = ops.pack(ops.quantize(w, s, z, 4, 64), 4, 64)\n"
        "y = ops.packed_matmul(torch.randn(2, 64), p, s, z, None, 4, 64, 64)\n"
        "v = torch.randn(8, 64, requires_grad=True)\n"
        "loss = ops.adaround_forward(w, v, s, z, 4, 64).sum() + ops.rounding_loss(v, 4.0)\n"
        "loss.backward()\n"
        "assert v.grad is not None and bool(v.grad.abs().sum() > 0)\n"
        "from brecq_ext.layout import to_tile16\n"
        "assert brecq_ext.QuantLinear(64, 8, 4, 64).layout is brecq_ext.Layout.ROWS  # no TILE16 kernel\n"
        "x = torch.randn(2, 64)\n"
        "yt = ops.tile16_matmul(x, *to_tile16(p, s, z, 4, 64, 64), None, 4, 64, 64, 8)\n"
        "assert torch.allclose(yt, ops.packed_matmul(x, p, s, z, None, 4, 64, 64), atol=1e-5)\n"
        "print(brecq_ext.cpu_isa(), tuple(y.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reference (2, 8)"
    assert done.stderr.count("compiled CPU kernels are not available") == 1
