"""No memory leaks: many forward+backward iterations leave memory where it was.

The checker (``assert_no_leak``) runs a step until it is warm, takes a snapshot, runs
it ``iterations`` more times and compares. Three counters, each blind where another sees:

- RSS (psutil): what the OS sees, including C++ and Triton allocations. It must stay
  flat, but alone it is a coarse meter: memory freed to glibc stays resident and a
  later leak can hide inside it.
- bytes in use by malloc (glibc ``mallinfo2``): exact, and blind to the free pool, so a
  leak of a few KiB per call in native code shows up.
- live tensors reachable from Python (count and storage bytes): a tensor kept alive by
  a cache, a global or an autograd graph that was never freed.

On CUDA, ``torch.cuda.memory_allocated()`` must come back to the same byte.

The deliberately leaking steps below (a kept gradient, a native malloc without free)
run through the same checker and must make it fail.

Iterations: 1000 for the reference and the C++ kernel. The Triton interpreter costs
~10-80 ms per call on CPU, so it runs 60 iterations on small rows; its leaks are
exercised properly by the CUDA variant on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import warnings
from typing import Callable, Dict, List

import psutil
import pytest
import torch

from _hypothesis import BACKENDS
from moekd_kernels import available_backends, fused_moe_kd_loss
from oracle import make_case

ITERATIONS = {"triton": 60}
DEFAULT_ITERATIONS = 1000
SIZES = {"triton": (2, 4096)}          # (rows, classes): the interpreter's cost is per row
DEFAULT_SIZE = (16, 256)

RSS_LIMIT = 8 << 20        # after warm-up; a flat RSS moves by a few hundred KiB at most
MALLOC_LIMIT = 256 << 10   # observed growth over 1000 clean iterations: < 8 KiB


# ---------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):   # not glibc >= 2.33: that counter is skipped
        return None


_LIBC = _load_libc()


def _malloc_in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd     # heap chunks in use + mmapped chunks


def _live_tensors():
    count, storages = 0, {}
    with warnings.catch_warnings():
        # isinstance() on some lazily deprecated torch objects warns; irrelevant here.
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        count += 1
        try:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - exotic tensors (sparse, fake): counted, not sized
            continue
    del objects
    return count, sum(storages.values())


def snapshot() -> Dict[str, int]:
    gc.collect()
    tensors, tensor_bytes = _live_tensors()
    snap = {"rss": psutil.Process().memory_info().rss, "tensors": tensors, "tensor_bytes": tensor_bytes}
    if _LIBC is not None:
        snap["malloc"] = _malloc_in_use()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        snap["cuda"] = torch.cuda.memory_allocated()
    return snap


def assert_no_leak(step: Callable[[], None], iterations: int, warmup: int = None) -> Dict[str, int]:
    """Run ``step`` ``iterations`` times after a warm-up; fail naming every counter that grew."""
    for _ in range(warmup if warmup is not None else max(20, iterations // 10)):
        step()
    before = snapshot()
    for _ in range(iterations):
        step()
    after = snapshot()
    growth = {k: after[k] - before[k] for k in before}
    limits = {"rss": RSS_LIMIT, "malloc": MALLOC_LIMIT, "tensors": 0, "tensor_bytes": 0, "cuda": 0}
    leaks = [f"{k} +{v:,}" for k, v in growth.items() if v > limits[k]]
    assert not leaks, f"leak over {iterations} iterations: {', '.join(leaks)} (limits {limits})"
    return growth


# ---------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------

def _training_step(backend: str, device: str = "cpu", kept: List = None):
    """fwd+bwd with stats; every 10th step also an inference forward (no_grad) and a
    forward whose graph is dropped without backward.

    ``kept`` makes it leak: every gradient is appended to it.
    """
    num_rows, num_classes = SIZES.get(backend, DEFAULT_SIZE)
    case = make_case(num_rows, num_classes, 2, seed=0, device=device)
    student = case.student.clone().requires_grad_(True)
    calls = [0]

    def step():
        loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, backend=backend,
                                        return_stats=True, temperature=[1.0, 4.0])
        loss.backward()
        if kept is not None:
            kept.append(student.grad)
        student.grad = None
        calls[0] += 1
        if calls[0] % 10 == 0:
            with torch.no_grad():
                fused_moe_kd_loss(student, case.teacher, case.target, backend=backend, reduction="none")
            fused_moe_kd_loss(student, case.teacher, case.target, backend=backend, reduction="sum")

    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loop_does_not_leak(backend):
    growth = assert_no_leak(_training_step(backend), ITERATIONS.get(backend, DEFAULT_ITERATIONS))
    assert growth["tensors"] <= 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_checker_catches_a_kept_gradient(backend):
    """The same loop, keeping every gradient alive: the checker must fail (on the
    tensor and malloc counters; RSS only when the leak outgrows the free pool)."""
    kept = []
    iterations = ITERATIONS.get(backend, DEFAULT_ITERATIONS) // 10
    with pytest.raises(AssertionError, match=r"leak over .*tensors \+"):
        assert_no_leak(_training_step(backend, kept=kept), iterations, warmup=5)
    assert len(kept) > 0
    kept.clear()


@pytest.mark.skipif(_LIBC is None, reason="needs glibc's mallinfo2 and malloc")
def test_checker_catches_a_native_leak():
    """A C-level allocation never freed (what a kernel bug would do) is invisible to the
    tensor counter; malloc's in-use bytes and, for large blocks, RSS must catch it."""
    blocks = []

    def leak(size):
        def step():
            pointer = _LIBC.malloc(size)
            ctypes.memset(pointer, 1, size)          # touch it, so it is resident
            blocks.append(pointer)
        return step

    try:
        with pytest.raises(AssertionError, match=r"malloc \+"):
            assert_no_leak(leak(4 << 10), 1000)        # 4 KiB a call: from the heap
        # 2 MiB a call, 128 MiB in all: more than glibc can hold in its free pool, so the
        # OS sees it whether the blocks come from mmap or from the heap.
        with pytest.raises(AssertionError, match=r"rss \+.*malloc \+"):
            assert_no_leak(leak(2 << 20), 64, warmup=0)
    finally:
        for pointer in blocks:
            _LIBC.free(pointer)


CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else ()


@pytest.mark.skipif(not CUDA_BACKENDS, reason="no CUDA device: the GPU allocator check runs on GPU machines")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_training_loop_does_not_leak_gpu_memory(backend):
    growth = assert_no_leak(_training_step(backend, device="cuda"), 1000)
    assert growth["cuda"] == 0
    kept = []
    with pytest.raises(AssertionError, match=r"cuda \+"):
        assert_no_leak(_training_step(backend, device="cuda", kept=kept), 100)
    kept.clear()
