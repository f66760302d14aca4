from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import brecq_ext

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES260K = SHARED / "models" / "stories260k"
DATA = SHARED / "data"

_ISA_ORDER = ["avx512", "avx512vnni", "avx2", "scalar"]


def pytest_configure(config):
    # Without the compiled kernels every op runs its reference and the kernel tests would compare
    # the reference with itself. That happens when the source tree shadows the installed package
    # (`python -m pytest` puts the current directory first on sys.path): refuse to run.
    if brecq_ext.cpu_isa() == "reference" and os.environ.get("BRECQ_ALLOW_REFERENCE") != "1":
        raise pytest.UsageError(
            f"brecq_ext was imported from {Path(brecq_ext.__file__).parent} without its compiled "
            "kernels. Install with `pip install .` and run `pytest` (not `python -m pytest`) from the "
            "repository root; set BRECQ_ALLOW_REFERENCE=1 to test the reference alone.")


def available_isas() -> list[str]:
    detected = brecq_ext.detected_cpu_isa()
    if detected == "reference":
        return ["reference"]
    return _ISA_ORDER[_ISA_ORDER.index(detected):]


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device"))]


@pytest.fixture(params=available_isas())
def isa(request):
    """Runs a test once per CPU code path this machine can execute."""
    if request.param == "reference":
        yield "reference"
        return
    previous = brecq_ext.cpu_isa()
    brecq_ext.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        brecq_ext.set_cpu_isa(previous)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not present (the project's shared data folder)")
    return path
