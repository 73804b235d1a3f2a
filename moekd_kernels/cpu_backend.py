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

import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from .options import MoEKDOptions

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_LEVELS = 8  # moekd::kMaxLevels in csrc/common/moekd_math.h

# -O3 and the vector ISA of this CPU, but no -ffast-math: the kernel relies on
# IEEE inf/NaN (masked classes, NaN propagation). -fno-math-errno and
# -fno-trapping-math only let the compiler vectorise; they change no value.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
_SOURCES = ("cpu/moekd_cpu.cpp", "cpu/binding.cpp")
_HEADERS = ("cpu/moekd_cpu.h", "common/moekd_math.h")

_lock = threading.Lock()
_extension = None
_failure: Optional[str] = None


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources (csrc/{_SOURCES[0]}) are not next to {here}")


def _cpu_fingerprint() -> str:
    """CPU model and feature flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _sources_key(csrc: Path) -> str:
    h = hashlib.sha256()
    for rel in _SOURCES + _HEADERS:
        h.update(rel.encode())
        h.update((csrc / rel).read_bytes())
    return h.hexdigest()


def _environment_key() -> str:
    h = hashlib.sha256()
    for part in (CFLAGS, LDFLAGS, torch.__version__, sys.version, platform.machine(),
                 _cpu_fingerprint(), os.environ.get("CXX", "")):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    root = os.environ.get("MOEKD_KERNELS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moekd_kernels"


def _import_built(name: str, build_dir: Path):
    """The already-built module, or None when it does not load."""
    for path in sorted(build_dir.glob(f"{name}.*so")) + sorted(build_dir.glob(f"{name}.pyd")):
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - stale or half-written: rebuild
            return None
    return None


def _build(csrc: Path, build_dir: Path, name: str = "moekd_cpu"):
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    stamp = build_dir / "sources.sha256"
    key = _sources_key(csrc)
    if stamp.is_file() and stamp.read_text().strip() == key:
        module = _import_built(name, build_dir)
        if module is not None:
            return module
    print("moekd_kernels: building the C++ CPU kernel (once, ~30 s)...", file=sys.stderr, flush=True)
    module = load(
        name=name,
        sources=[str(csrc / s) for s in _SOURCES],
        extra_cflags=list(CFLAGS),  # load() appends to the lists it is given
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        with_cuda=False,
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
    return f"the C++ CPU kernel could not be built ({type(exc).__name__}): {text}"


def _load() -> Tuple[Optional[object], Optional[str]]:
    """(extension, None) or (None, why not); builds at most once per process."""
    global _extension, _failure
    with _lock:
        if _extension is None and _failure is None:
            try:
                _extension = _build(_csrc_dir(), _cache_root() / f"cpu-{_environment_key()}")
            except Exception as exc:  # noqa: BLE001 - any failure means "unavailable, because ..."
                _failure = _failure_message(exc)
        return _extension, _failure


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, not {device_type}"
    return _load()[1]


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"student_logits must be float32, bfloat16 or float16 for backend 'cpu', got "
            f"{student.dtype} (backend='auto' or 'reference' handles float64)"
        )
    if teacher.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise TypeError(
            f"teacher_logits must be float32, bfloat16, float16 or float64 for backend 'cpu', "
            f"got {teacher.dtype}"
        )
    if teacher.shape[0] > MAX_LEVELS:
        raise ValueError(
            f"teacher_logits has L={teacher.shape[0]} levels; backend 'cpu' supports at most "
            f"{MAX_LEVELS} (use backend='reference' for more)"
        )
    if student.device.type != "cpu" or teacher.device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got {student.device}")


def forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
            opts: MoEKDOptions):
    """student (N, C), teacher (L, N, C), target (N,) → (loss, log_likelihood, agreement, grad)."""
    _check_inputs(student, teacher)
    extension, failure = _load()
    if extension is None:
        raise RuntimeError(f"backend='cpu' is not available: {failure}")
    loss, log_likelihood, agreement, grad = extension.moe_kd_rows(
        student, teacher, target,
        list(opts.temperatures), list(opts.expert_strengths), list(opts.level_weights),
        float(opts.gate_weight), float(opts.expert_weight), int(opts.ignore_index),
        torch.get_num_threads(),
    )
    return loss, log_likelihood, agreement, grad
