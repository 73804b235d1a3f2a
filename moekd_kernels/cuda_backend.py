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
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from .options import MoEKDOptions

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_LEVELS = 8  # moekd::kMaxLevels in csrc/common/moekd_math.h

# moekd_cuda::Path in csrc/cuda/moekd_cuda.h.
PATHS = {"auto": 0, "warp": 1, "block": 2, "cluster": 3, "stream": 4}
FORCE_PATH = os.environ.get("MOEKD_CUDA_PATH", "auto")

# No --use_fast_math: the kernel relies on IEEE inf/NaN (masked classes, NaN
# propagation) and picks its fast intrinsics itself where they are accurate.
CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]
_SOURCES = ("cuda/binding.cpp", "cuda/moekd_cuda.cu")
_HEADERS = ("cuda/moekd_cuda.h", "cuda/moekd_cuda.cuh", "cuda/moekd_row.h", "common/moekd_math.h")

_lock = threading.Lock()
_extension = None
_failure: Optional[str] = None


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / _SOURCES[1]).is_file():
            return candidate
    raise FileNotFoundError(f"the CUDA sources (csrc/{_SOURCES[1]}) are not next to {here}")


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def arch_flags(arch: str) -> list:
    """nvcc flags for one architecture, e.g. "90": real code only, no PTX to JIT."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _sources_key(csrc: Path) -> str:
    h = hashlib.sha256()
    for rel in _SOURCES + _HEADERS:
        h.update(rel.encode())
        h.update((csrc / rel).read_bytes())
    return h.hexdigest()


def _environment_key(arch: str) -> str:
    h = hashlib.sha256()
    for part in (CUDA_FLAGS, CXX_FLAGS, arch, torch.__version__, torch.version.cuda, sys.version,
                 shutil.which("nvcc") or os.environ.get("CUDA_HOME", "")):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    root = os.environ.get("MOEKD_KERNELS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moekd_kernels"


def _import_built(name: str, build_dir: Path):
    """The already-built module, or None when it does not load."""
    for path in sorted(build_dir.glob(f"{name}.*so")):
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - stale or half-written: rebuild
            return None
    return None


def _build(csrc: Path, arch: str):
    from torch.utils.cpp_extension import load

    name = f"moekd_cuda_sm{arch}"
    build_dir = _cache_root() / f"cuda-{_environment_key(arch)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp = build_dir / "sources.sha256"
    key = _sources_key(csrc)
    if stamp.is_file() and stamp.read_text().strip() == key:
        module = _import_built(name, build_dir)
        if module is not None:
            return module
    print(f"moekd_kernels: building the CUDA kernel for sm_{arch} (once, ~30 s)...", file=sys.stderr,
          flush=True)
    module = load(
        name=name,
        sources=[str(csrc / s) for s in _SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS + arch_flags(arch),
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        with_cuda=True,
        verbose=False,
    )
    partial = stamp.with_name(f"{stamp.name}.{os.getpid()}")
    partial.write_text(key)
    os.replace(partial, stamp)
    return module


def _failure_message(exc: BaseException, limit: int = 3000) -> str:
    text = str(exc).strip() or type(exc).__name__
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"the CUDA kernel could not be built ({type(exc).__name__}): {text}"


def _load() -> Tuple[Optional[object], Optional[str]]:
    """(extension, None) or (None, why not); builds at most once per process."""
    global _extension, _failure
    with _lock:
        if _extension is None and _failure is None:
            if not torch.cuda.is_available():
                return None, "torch.cuda.is_available() is False"
            if torch.version.cuda is None:
                return None, f"this PyTorch ({torch.__version__}) is built without CUDA"
            try:
                _extension = _build(_csrc_dir(), _arch())
            except Exception as exc:  # noqa: BLE001 - any failure means "unavailable, because ..."
                _failure = _failure_message(exc)
        return _extension, _failure


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, not {device_type}"
    return _load()[1]


def _path_code() -> int:
    if FORCE_PATH not in PATHS:
        raise ValueError(f"MOEKD_CUDA_PATH must be one of {tuple(PATHS)}, got {FORCE_PATH!r}")
    return PATHS[FORCE_PATH]


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"student_logits must be float32, bfloat16 or float16 for backend 'cuda', got "
            f"{student.dtype} (backend='auto' or 'reference' handles float64)"
        )
    if teacher.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"teacher_logits must be float32, bfloat16 or float16 for backend 'cuda', got {teacher.dtype}"
        )
    if teacher.shape[0] > MAX_LEVELS:
        raise ValueError(
            f"teacher_logits has L={teacher.shape[0]} levels; backend 'cuda' supports at most "
            f"{MAX_LEVELS} (use backend='reference' for more)"
        )
    if student.device.type != "cuda" or teacher.device.type != "cuda":
        raise ValueError(f"backend 'cuda' takes CUDA tensors, got {student.device}")


def forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
            opts: MoEKDOptions):
    """student (N, C), teacher (L, N, C), target (N,) → (loss, log_likelihood, agreement, grad)."""
    _check_inputs(student, teacher)
    extension, failure = _load()
    if extension is None:
        raise RuntimeError(f"backend='cuda' is not available: {failure}")
    stream = torch.cuda.current_stream(student.device).cuda_stream
    loss, log_likelihood, agreement, grad = extension.forward(
        student, teacher, target,
        list(opts.temperatures), list(opts.expert_strengths), list(opts.level_weights),
        float(opts.gate_weight), float(opts.expert_weight), int(opts.ignore_index),
        int(stream), _path_code(),
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
    code = PATHS[path] if path is not None else _path_code()
    return extension.describe_plan(device, int(num_classes), int(num_levels), _DTYPE_NAMES[dtype],
                                   _DTYPE_NAMES[teacher_dtype or dtype], code)
