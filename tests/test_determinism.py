"""Bitwise determinism on every backend usable here.

What holds on CPU (all asserted below, for every backend in available_backends("cpu")):
- repeated calls give bitwise-identical loss, stats and gradient;
- the thread count (torch.set_num_threads 1 vs 2) changes no bit: each row is
  reduced by one thread, in an order fixed by C alone (the C++ kernel splits rows,
  never a row, across OpenMP threads);
- for the kernels ("cpu", "triton"), a row's results do not change by one bit with the
  rest of the batch (alone, in its batch, or moved among other rows). The reference
  does not promise this: its torch reductions over (levels, classes) may pick another
  summation order for another N (a last-bit difference for C = 5000); that it agrees
  to rounding is tested in test_properties.py;
- torch.use_deterministic_algorithms(True) is accepted.
On CUDA (run when a GPU is present): repeated calls are bitwise identical. The GPU
kernels run one program per row with no atomics, so the result depends only on the
inputs and the launch configuration (block size, which is a function of C and L).
"""

from __future__ import annotations

import pytest
import torch

from _hypothesis import BACKENDS
from moekd_kernels import available_backends, fused_moe_kd_loss
from oracle import make_case

# (rows, classes): many short rows, and a few long ones (C past one SIMD/sum block of the
# C++ kernel and past one Triton tile under the interpreter).
SHAPES = {"many short rows": (96, 40), "few long rows": (3, 5000)}
ROW_LIMIT = {"triton": 16}   # the interpreter runs one Python loop per row


def _shape(backend, name):
    num_rows, num_classes = SHAPES[name]
    return min(num_rows, ROW_LIMIT.get(backend, num_rows)), num_classes


def _run(backend, case, reduction="none", **options):
    student = case.student.clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, reduction=reduction,
                                    backend=backend, return_stats=True, **{**case.options, **options})
    loss.backward(torch.ones_like(loss))
    return {"loss": loss.detach(), "log_likelihood": stats.log_likelihood,
            "agreement": stats.agreement, "grad": student.grad}


def _assert_bitwise(a, b, what):
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}: {name} dtype"
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_repeated_calls_are_bitwise_identical(backend, shape, dtype, reduction):
    case = make_case(*_shape(backend, shape), 2, dtype=dtype, seed=1, temperature=[1.0, 3.0],
                     expert_strength=[2.0, 8.0])
    first = _run(backend, case, reduction)
    for _ in range(2):
        _assert_bitwise(_run(backend, case, reduction), first, f"{backend} repeat")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_thread_count_changes_no_bit(backend, shape, restore_threads):
    case = make_case(*_shape(backend, shape), 3, seed=2)
    torch.set_num_threads(1)
    one = _run(backend, case)
    torch.set_num_threads(2)
    two = _run(backend, case)
    _assert_bitwise(two, one, f"{backend} 1 vs 2 threads")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_a_row_does_not_depend_on_its_batch_by_one_bit(backend, shape):
    num_rows, num_classes = _shape(backend, shape)
    case = make_case(num_rows, num_classes, 2, seed=3, ignore_frac=0.0)
    whole = _run(backend, case)
    row = num_rows // 2
    alone = _run(backend, type(case)(case.student[row:row + 1], case.teacher[:, row:row + 1],
                                     case.target[row:row + 1]))
    _assert_bitwise(alone, {k: v[row:row + 1] for k, v in whole.items()}, f"{backend} alone vs batch")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(4))
    shuffled = _run(backend, type(case)(case.student[order], case.teacher[:, order], case.target[order]))
    _assert_bitwise(shuffled, {k: v[order] for k, v in whole.items()}, f"{backend} shuffled batch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_algorithms_mode_is_accepted(backend):
    case = make_case(8, 30, 2, seed=5)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        on = _run(backend, case, "mean")
    finally:
        torch.use_deterministic_algorithms(was)
    _assert_bitwise(on, _run(backend, case, "mean"), f"{backend} deterministic mode")


CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else ()


@pytest.mark.skipif(not CUDA_BACKENDS, reason="no CUDA device: the GPU determinism check runs on GPU machines")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("num_classes", [40, 5000, 70000])
def test_repeated_calls_are_bitwise_identical_on_cuda(backend, num_classes):
    case = make_case(64, num_classes, 2, dtype=torch.bfloat16, seed=6, device="cuda")
    first = _run(backend, case, "mean")
    for _ in range(3):
        _assert_bitwise(_run(backend, case, "mean"), first, f"{backend} cuda repeat")
