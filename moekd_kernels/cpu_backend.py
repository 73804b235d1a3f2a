"""Backend "cpu": the fused C++/OpenMP kernel in csrc/cpu, JIT-built on first use.

The extension is compiled into ~/.cache/moekd_kernels (or ``$MOEKD_KERNELS_CACHE``),
in a folder named by a hash of the compiler flags, the torch and Python versions
and the CPU model and features: the kernel is compiled with ``-march=native``,
so a home directory shared by different machines gets one build per CPU. A stamp
file holds the hash of the sources it was built from; while it matches, later
processes import the library directly, and a changed source rebuilds (ninja
recompiles only what changed).

A failed build is tried once per process; ``unavailable_reason("cpu")`` then
returns why (the tail of the compiler output) and ``backend="auto"`` falls back
to the reference.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Optional

import torch

from ._jit import (KERNEL_DTYPES, JitExtension, LoadedExtension, cache_root, check_kernel_inputs,
                   environment_key, kernel_options)
from .options import MoEKDOptions
from .phases import KernelPhases, SliceTeacher
from .teachers import TopKRows

# -O3 and the vector ISA of this CPU, but no -ffast-math: the kernel relies on
# IEEE inf/NaN (masked classes, NaN propagation). -fno-math-errno and
# -fno-trapping-math only let the compiler vectorise; they change no value.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
_SOURCES = ("cpu/moekd_cpu.cpp", "cpu/binding.cpp")
_HEADERS = ("cpu/moekd_cpu.h", "common/moekd_math.h", "common/binding_inputs.h")
_KERNEL = JitExtension("the C++ CPU kernel", _SOURCES, _HEADERS, marker=_SOURCES[0])


def _cpu_fingerprint() -> str:
    """CPU model and feature flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _environment_key() -> str:
    return environment_key(CFLAGS, LDFLAGS, torch.__version__, sys.version, platform.machine(),
                           _cpu_fingerprint(), os.environ.get("CXX", ""))


def build_dir():
    return cache_root() / f"cpu-{_environment_key()}"


def _build(csrc, build_dir, name: str = "moekd_cpu"):
    return _KERNEL.build(csrc, build_dir, name, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, with_cuda=False)


EXTENSION = LoadedExtension(_KERNEL, lambda: _build(_KERNEL.csrc_dir(), build_dir()))


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, not {device_type}"
    return EXTENSION.load()[1]


def forward(student: torch.Tensor, teacher, target: torch.Tensor,
            opts: MoEKDOptions, grad_scale: Optional[torch.Tensor] = None, need_grad: bool = True):
    """student (N, C), teacher (L, N, C) or ``teachers.TopKRows``, target (N,) →
    (loss, log_likelihood, agreement, grad).

    grad is ``grad_scale`` · ∂loss/∂s (None: 1), scaled in float before the rounding to the
    student's dtype; a 0-dim CPU tensor, so reading it here is no device sync. With
    ``need_grad=False`` the kernel skips its gradient pass and no N×C buffer is allocated:
    grad is None, loss and stats are the same bits. A top-k teacher is read as it is: the
    kernel builds each dense teacher row in a per-thread scratch row, never N×C of them.
    """
    scale = 1.0 if grad_scale is None else float(grad_scale)
    # Precomputed teacher logits are often float64: the kernel reads them as they are, without a copy.
    if isinstance(teacher, TopKRows):
        check_kernel_inputs("cpu", student, teacher.values, KERNEL_DTYPES + (torch.float64,))
        return tuple(EXTENSION.require("cpu").moe_kd_rows_topk(
            student, teacher.indices, teacher.values, teacher.rest, 0, target, *kernel_options(opts),
            torch.get_num_threads(), scale, bool(need_grad),
        ))
    check_kernel_inputs("cpu", student, teacher, KERNEL_DTYPES + (torch.float64,))
    loss, log_likelihood, agreement, grad = EXTENSION.require("cpu").moe_kd_rows(
        student, teacher, target, *kernel_options(opts), torch.get_num_threads(), scale, bool(need_grad),
    )
    return loss, log_likelihood, agreement, grad


class _CpuPhases(KernelPhases):
    """The phase functions of ``phases.py`` (same signatures, same results up to float32
    rounding), run by the C++ kernel on a class slice: per row, one thread and its scratch
    rows, and the teacher read by the same loaders as the fused kernel (a top-k teacher
    never becomes N×C_r)."""

    @staticmethod
    def check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
        """The dtypes the kernel takes; ``teacher`` the dense logits or the top-k values."""
        check_kernel_inputs("cpu", student, teacher if teacher.dim() == 3 else teacher[None],
                            KERNEL_DTYPES + (torch.float64,))

    @staticmethod
    def run(phase: int, student, teacher: SliceTeacher, target, row_in, grad_scale=None):
        opts = teacher.opts
        if target is None:  # the first two phases do not read it
            target = torch.zeros(student.shape[0], dtype=torch.long)
        top_k = teacher.rows if teacher.rows is not None else (None, None, None)
        return EXTENSION.require("cpu").moe_kd_phase(
            phase, student, teacher.dense, *top_k, teacher.class_offset, target, row_in,
            *kernel_options(opts), torch.get_num_threads(), 1.0 if grad_scale is None else float(grad_scale))


phases = _CpuPhases()
