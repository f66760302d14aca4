"""Benchmarks (pytest-benchmark). Not part of the test suite; run them with the command in
bench/README.md. Every benchmark records the bytes it reads so that summarize.py can report
GB/s and ratios side by side from one JSON file."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # Timings are for the whole machine's cores unless BRECQ_BENCH_THREADS says otherwise.
    import os
    threads = int(os.environ.get("BRECQ_BENCH_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    yield
