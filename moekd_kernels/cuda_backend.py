"""Backend "cuda": the fused CUDA C++ kernel in csrc/cuda, JIT-built with nvcc on first use.

The kernel (csrc/cuda/moekd_cuda.cu) knows nothing of PyTorch; csrc/cuda/binding.cpp
checks the tensors, allocates the outputs and launches it on the current stream.
It is built for the architecture of the current GPU only (sm_90 on Hopper) into
~/.cache/moekd_kernels (or ``$MOEKD_KERNELS_CACHE``), in a folder named by a hash
of the flags, the architecture and the torch/CUDA/Python versions. A stamp file
holds the hash of the sources; while it matches, later processes import the built
library directly.

A failed build is tried once per process; ``unavailable_reason("cuda")`` then
returns why, and ``backend="auto"`` moves on to the next backend.

How rows map onto the GPU is decided per call from C, L and the dtypes (see
``describe_plan``); ``MOEKD_CUDA_PATH`` (or the module attribute ``FORCE_PATH``)
forces one of "warp", "block", "cluster", "stream" for tests and benchmarks, and
``PREFETCH`` turns the asynchronous prefetch of the cached paths on or off (both
are read on each call).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch

from ._jit import (DTYPE_NAMES, JitExtension, LoadedExtension, cache_root, check_kernel_inputs,
                   environment_key, kernel_options)
from .options import MoEKDOptions

# moekd_cuda::Path in csrc/cuda/moekd_cuda.h.
PATHS = {"auto": 0, "warp": 1, "block": 2, "cluster": 3, "stream": 4}
FORCE_PATH = os.environ.get("MOEKD_CUDA_PATH", "auto")
# 1: the cached paths load their whole share of the row into shared memory with
# asynchronous copies before pass 1, so the memory latency is waited out once per
# row, not once per chunk. On an H100 (bf16, N=16384) that made them 1.07–1.23×
# faster (benchmarks/RESULTS.md); the streamed path has no cache and ignores it.
PREFETCH = 1

# No --use_fast_math: the kernel relies on IEEE inf/NaN (masked classes, NaN
# propagation) and picks its fast intrinsics itself where they are accurate.
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]
_SOURCES = ("cuda/binding.cpp", "cuda/moekd_cuda.cu")
_HEADERS = ("cuda/moekd_cuda.h", "cuda/moekd_cuda.cuh", "cuda/moekd_row.h", "common/moekd_math.h",
            "common/binding_inputs.h")
_KERNEL = JitExtension("the CUDA kernel", _SOURCES, _HEADERS, marker=_SOURCES[1])


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def arch_flags(arch: str) -> list:
    """nvcc flags for one architecture, e.g. "90": real code only, no PTX to JIT."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _environment_key(arch: str) -> str:
    return environment_key(CUDA_FLAGS, CXX_FLAGS, arch, torch.__version__, torch.version.cuda, sys.version,
                           shutil.which("nvcc") or os.environ.get("CUDA_HOME", ""))


def _build(csrc, arch: str):
    build_dir = cache_root() / f"cuda-{_environment_key(arch)}"
    return _KERNEL.build(csrc, build_dir, f"moekd_cuda_sm{arch}", target=f" for sm_{arch}",
                         extra_cflags=CXX_FLAGS, extra_cuda_cflags=CUDA_FLAGS + arch_flags(arch),
                         with_cuda=True)


def _no_cuda() -> Optional[str]:
    """Why there is nothing to build for, if so: not a build failure, so asked again each time."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    return None


EXTENSION = LoadedExtension(_KERNEL, lambda: _build(_KERNEL.csrc_dir(), _arch()), precheck=_no_cuda)


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device_type}"
    return EXTENSION.load()[1]


def _path_code(name: str) -> int:
    if name not in PATHS:
        raise ValueError(f"the cuda path (MOEKD_CUDA_PATH, FORCE_PATH) must be one of {tuple(PATHS)}, "
                         f"got {name!r}")
    return PATHS[name]


def forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
            opts: MoEKDOptions, grad_scale: Optional[torch.Tensor] = None, need_grad: bool = True):
    """student (N, C), teacher (L, N, C), target (N,) → (loss, log_likelihood, agreement, grad).

    grad is ``grad_scale`` · ∂loss/∂s (None: 1). grad_scale is a one-element tensor on the
    student's device; the kernel reads it there, so it is never copied to the host (no sync).
    With ``need_grad=False`` the kernel skips its gradient pass and no N×C buffer is
    allocated: grad is None, loss and stats are the same bits.
    """
    check_kernel_inputs("cuda", student, teacher)
    extension = EXTENSION.require("cuda")
    stream = torch.cuda.current_stream(student.device).cuda_stream
    if grad_scale is not None:
        # Checked here as well as in the binding: a size error raised in the binding
        # crashed the process on an H100 machine with torch 2.11 while it streamed the shape.
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must hold one value, got shape {tuple(grad_scale.shape)}")
        if grad_scale.device != student.device:
            raise RuntimeError(f"grad_scale must be on the student's device ({student.device}), "
                               f"got {grad_scale.device}")
        if grad_scale.dtype != torch.float32:
            grad_scale = grad_scale.to(torch.float32)  # on the device: no sync
    loss, log_likelihood, agreement, grad = extension.forward(
        student, teacher, target, *kernel_options(opts),
        int(stream), _path_code(FORCE_PATH), int(PREFETCH), grad_scale, bool(need_grad),
    )
    return loss, log_likelihood, agreement, grad


def describe_plan(num_classes: int, num_levels: int = 1, dtype: torch.dtype = torch.bfloat16,
                  teacher_dtype: Optional[torch.dtype] = None, path: Optional[str] = None,
                  device: Optional[int] = None) -> str:
    """How the kernel would map rows of this shape onto the current GPU, in words."""
    extension = EXTENSION.require("cuda")
    device = torch.cuda.current_device() if device is None else device
    code = _path_code(path if path is not None else FORCE_PATH)
    return extension.describe_plan(device, int(num_classes), int(num_levels), DTYPE_NAMES[dtype],
                                   DTYPE_NAMES[teacher_dtype or dtype], code)
