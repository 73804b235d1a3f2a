"""pytest-benchmark suite for MoE-KD fwd+bwd: ``pytest benchmarks/ --benchmark-only``.

``MOEKD_BENCH_SHAPES`` picks the shapes: unset or ``cpu`` (default, sized for a 2-core
CPU), ``gpu`` (N=16384, C up to 262144, on CUDA), or a list like ``1024x32768,32x131072``.
``MOEKD_BENCH_DTYPES`` (default ``fp32,bf16``) picks the dtypes.
"""

import os
import sys

import pytest

# The suite runs from a plain checkout too: ``pytest benchmarks/`` puts only this
# folder on sys.path, not the repository root that holds the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from moekd_kernels import benchmarking  # noqa: E402

_RESULTS = []


@pytest.fixture(scope="session")
def bench_results():
    """Every measured case of the session, as ``benchmarking.Result``s (for the ratios)."""
    return _RESULTS


def pytest_report_header(config):
    shapes, device = benchmarking.suite_config(os.environ.get("MOEKD_BENCH_SHAPES"))
    return [f"moekd benchmarks: device={device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, shapes {[s.label for s in shapes]}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("MoE-KD fwd+bwd: throughput and speed-ups")
    tr.write_line("GB/s over the fused kernel's minimum traffic N·C·(2·bytes(s) + L·bytes(t)); "
                  "×X = this implementation's speed over X's (> 1: faster).")
    tr.write_line("")
    for line in benchmarking.markdown_table(_RESULTS).splitlines():
        tr.write_line(line)
