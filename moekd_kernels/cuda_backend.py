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
forces one of "warp", "block", "cluster", "stream" for tests and benchmarks.
``launch_config`` gives (path, prefetch) per call; benchmarks/gpu_check.py --sweep
replaces it to time each entry of ``SWEEP_SPACE``.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import Optional, Tuple

import torch

from ._jit import (DTYPE_NAMES, MAX_LEVELS, JitExtension, cache_root, check_kernel_inputs,
                   environment_key)
from .options import MoEKDOptions

# moekd_cuda::Path in csrc/cuda/moekd_cuda.h.
PATHS = {"auto": 0, "warp": 1, "block": 2, "cluster": 3, "stream": 4}
FORCE_PATH = os.environ.get("MOEKD_CUDA_PATH", "auto")

# (path, prefetch) candidates for the sweep. prefetch 1: the cached paths load their
# whole share of the row into shared memory with asynchronous copies before pass 1,
# so the memory latency is waited out once per row, not once per chunk. A forced
# path that cannot run a shape raises (the sweep logs it).
SWEEP_SPACE = [("auto", 1), ("auto", 0), ("cluster", 1), ("cluster", 0), ("block", 1), ("block", 0),
               ("stream", 0)]

# No --use_fast_math: the kernel relies on IEEE inf/NaN (masked classes, NaN
# propagation) and picks its fast intrinsics itself where they are accurate.
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]
_SOURCES = ("cuda/binding.cpp", "cuda/moekd_cuda.cu")
_HEADERS = ("cuda/moekd_cuda.h", "cuda/moekd_cuda.cuh", "cuda/moekd_row.h", "common/moekd_math.h",
            "common/binding_inputs.h")
_KERNEL = JitExtension("the CUDA kernel", _SOURCES, _HEADERS, marker=_SOURCES[1])

_lock = threading.Lock()
_extension = None
_failure: Optional[str] = None


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


def _load() -> Tuple[Optional[object], Optional[str]]:
    """(extension, None) or (None, why not); builds at most once per process."""
    global _extension, _failure
    with _lock:
        if _extension is None and _failure is None:
            # Not cached: these answers are cheap to ask again and are not build failures.
            if not torch.cuda.is_available():
                return None, "torch.cuda.is_available() is False"
            if torch.version.cuda is None:
                return None, f"this PyTorch ({torch.__version__}) is built without CUDA"
            _extension, _failure = _KERNEL.try_build(lambda: _build(_KERNEL.csrc_dir(), _arch()))
        return _extension, _failure


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device_type}"
    return _load()[1]


def launch_config(num_classes: int, num_levels: int, device_type: str) -> Tuple[str, int]:
    """(path name, prefetch 0/1) for rows of this shape; the kernel plans the rest.

    Prefetch is on: on an H100 (bf16, N=16384) it made the cached paths 1.07–1.23×
    faster (benchmarks/RESULTS.md); the streamed path has no cache and ignores it.
    """
    return FORCE_PATH, 1


def _path_code(name: str) -> int:
    if name not in PATHS:
        raise ValueError(f"the cuda path (MOEKD_CUDA_PATH, launch_config) must be one of {tuple(PATHS)}, "
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
    extension, failure = _load()
    if extension is None:
        raise RuntimeError(f"backend='cuda' is not available: {failure}")
    stream = torch.cuda.current_stream(student.device).cuda_stream
    # A module global looked up per call: the benchmark sweep replaces it.
    path, prefetch = launch_config(student.shape[1], teacher.shape[0], student.device.type)
    if grad_scale is not None:
        # Checked here as well as in the binding: the binding's size error crashed the
        # process on the H100 machine (torch 2.11) while it streamed the shape.
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must hold one value, got shape {tuple(grad_scale.shape)}")
        if grad_scale.device != student.device:
            raise RuntimeError(f"grad_scale must be on the student's device ({student.device}), "
                               f"got {grad_scale.device}")
        if grad_scale.dtype != torch.float32:
            grad_scale = grad_scale.to(torch.float32)  # on the device: no sync
    loss, log_likelihood, agreement, grad = extension.forward(
        student, teacher, target,
        list(opts.temperatures), list(opts.expert_strengths), list(opts.level_weights),
        float(opts.gate_weight), float(opts.expert_weight), int(opts.ignore_index),
        int(stream), _path_code(path), int(prefetch), grad_scale, bool(need_grad),
    )
    return loss, log_likelihood, agreement, grad


def describe_plan(num_classes: int, num_levels: int = 1, dtype: torch.dtype = torch.bfloat16,
                  teacher_dtype: Optional[torch.dtype] = None, path: Optional[str] = None,
                  device: Optional[int] = None) -> str:
    """How the kernel would map rows of this shape onto the current GPU, in words."""
    extension, failure = _load()
    if extension is None:
        raise RuntimeError(f"backend='cuda' is not available: {failure}")
    device = torch.cuda.current_device() if device is None else device
    code = _path_code(path if path is not None else launch_config(num_classes, num_levels, "cuda")[0])
    return extension.describe_plan(device, int(num_classes), int(num_levels), DTYPE_NAMES[dtype],
                                   DTYPE_NAMES[teacher_dtype or dtype], code)
