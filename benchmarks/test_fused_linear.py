"""fwd+bwd through the LM head on CPU: fused-linear MoE-KD against materialised logits.

    pytest benchmarks/test_fused_linear.py --benchmark-only
    MOEKD_BENCH_FUSED_LINEAR_LARGE=1 pytest benchmarks/test_fused_linear.py --benchmark-only -k large

Three implementations per shape and dtype (``fused_linear_memory.make_step``): (a)
``materialised``: ``h @ W.T`` then ``fused_moe_kd_loss``; (b) ``fused_linear``:
``fused_linear_moe_kd_loss``; (c) ``compiled_plain``: ``torch.compile`` of the plain
PyTorch MoE-KD with the GEMMs inside. The default run has one small shape (fp32); the
issue's shape N=4096, V=65536, H=512 (fp32 and bf16, ~10 s a step on 2 cores and several
GiB for (a) and (c)) runs when ``MOEKD_BENCH_FUSED_LINEAR_LARGE=1`` is set. Peak memory on
CPU needs a fresh process: ``python benchmarks/fused_linear_memory.py``.
"""

import os

import pytest
import torch

from fused_linear_memory import IMPLS, make_inputs, make_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = [("small", 512, 8192, 128, "fp32")]
LARGE = [("large", 4096, 65536, 512, d) for d in ("fp32", "bf16")]
RUN_LARGE = os.environ.get("MOEKD_BENCH_FUSED_LINEAR_LARGE") == "1"
CASES = [(*case, impl) for case in SMALL + LARGE for impl in IMPLS]

_medians = {}


@pytest.mark.parametrize("size,rows,vocab,hidden,dtype_name,impl", CASES,
                         ids=[f"{s}-{d}-N{n}-V{v}-H{h}-{i}" for s, n, v, h, d, i in CASES])
def test_fused_linear_fwd_bwd(benchmark, size, rows, vocab, hidden, dtype_name, impl):
    if size == "large" and not RUN_LARGE:
        pytest.skip("the issue's shape runs with MOEKD_BENCH_FUSED_LINEAR_LARGE=1")
    benchmark.group = f"fused-linear {dtype_name} N={rows} V={vocab} H={hidden}"
    step = make_step(impl, *make_inputs(rows, vocab, hidden, DTYPES[dtype_name]))
    step()  # warm-up: JIT build, compilation
    if size == "large":
        benchmark.pedantic(step, rounds=3, iterations=1)
    else:
        benchmark(step)
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    _medians[(benchmark.group, impl)] = median
    benchmark.extra_info.update(impl=impl, rows=rows, vocab=vocab, hidden=hidden, dtype=dtype_name,
                                median_ms=round(median * 1e3, 2))
    for other in IMPLS:
        if other != impl and (benchmark.group, other) in _medians:
            benchmark.extra_info[f"x_{other}"] = round(_medians[(benchmark.group, other)] / median, 3)
