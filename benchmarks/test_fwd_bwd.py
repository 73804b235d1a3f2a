"""fwd+bwd of every usable backend beside the eager, compiled and classic-KD baselines.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=out.json`` for
``benchmarks/plot.py``). One pytest-benchmark group per dtype and shape. Each case
records in ``extra_info`` its throughput (GB/s, bytes model in
``moekd_kernels.benchmarking.moekd_bytes``) and its speed-up over each baseline
measured before it in the same group; conftest.py prints them as one table.
"""

import os

import pytest
import torch

from moekd_kernels import benchmarking as B

SHAPES, DEVICE = B.suite_config(os.environ.get("MOEKD_BENCH_SHAPES"))
DEVICE_TYPE = torch.device(DEVICE).type
DTYPES = [d.strip() for d in os.environ.get("MOEKD_BENCH_DTYPES", "fp32,bf16").split(",") if d.strip()]

if DEVICE_TYPE == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"MOEKD_BENCH_SHAPES selects {DEVICE}, but CUDA is not available",
                allow_module_level=True)

IMPLS = {impl.name: impl for impl in B.implementations(DEVICE_TYPE)}
CASES = [(shape, dtype, name) for dtype in DTYPES for shape in SHAPES for name in IMPLS]

_inputs_cache = {}


def _inputs(shape, dtype, fresh):
    """One set of inputs per (shape, dtype), freed when the next one is made (GPU memory)."""
    if fresh:
        return B.make_inputs(shape, dtype, DEVICE)
    key = (shape, dtype)
    if key not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[key] = B.make_inputs(shape, dtype, DEVICE)
    return _inputs_cache[key]


@pytest.mark.parametrize(
    "shape,dtype_name,impl_name", CASES,
    ids=[f"{d}-N{s.rows}-C{s.classes}" + (f"-L{s.levels}" if s.levels != 1 else "") + f"-{n}"
         for s, d, n in CASES])
def test_fwd_bwd(benchmark, bench_results, shape, dtype_name, impl_name):
    impl = IMPLS[impl_name]
    dtype = B.DTYPES[dtype_name]
    benchmark.group = f"{dtype_name} {shape.label}"
    # Liger overwrites the logits it is given: it gets its own copy.
    inputs = _inputs(shape, dtype, fresh=impl_name == "liger_classic_kd")
    prepared = B.prepare_step(impl, shape, dtype, DEVICE, inputs=inputs, min_rows=256)
    peak = B.peak_extra_bytes(prepared.step, DEVICE)   # also the second warm-up call

    if DEVICE_TYPE == "cuda":
        def run():
            prepared.step()
            torch.cuda.synchronize()
    else:
        run = prepared.step

    benchmark(run)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    median_s = benchmark.stats.stats.median
    result = B.Result(
        impl_name, dtype_name, prepared.shape.rows, shape.classes, shape.levels,
        median_s * 1e3, B.gb_per_s(prepared.num_bytes, median_s), benchmark.stats.stats.rounds,
        max(prepared.first_call_s - median_s, 0.0) if impl_name == "compiled_moekd" else None,
        None if peak is None else peak / 1e9, prepared.note)
    bench_results.append(result)
    ratios = B.speedups(bench_results)[(impl_name, result.key)]
    benchmark.extra_info.update(
        impl=impl_name, backend=impl.is_backend, dtype=dtype_name, device=DEVICE,
        rows=result.rows, classes=shape.classes, levels=shape.levels,
        bytes=prepared.num_bytes, gbps=result.gbps, median_ms=result.median_ms,
        first_call_s=round(prepared.first_call_s, 3),
        **({"compile_s": round(result.compile_s, 3)} if result.compile_s is not None else {}),
        **({"peak_extra_gb": round(result.peak_extra_gb, 3)} if peak is not None else {}),
        **({"note": result.note} if result.note else {}),
        **{f"x_{b}": round(x, 3) for b, x in ratios.items()},
    )
