"""The backend registry: one table of name → implementation.

Every backend implements the same contract (see ``reference.reference_forward``):

    forward(student (N, C), teacher (L, N, C), target (N,) int64, opts, grad_scale=None,
            need_grad=True)
        -> (loss (N,), log_likelihood (N,), agreement (N,), grad (N, C) or None)

``loss`` and the stats are float32 (float64 for float64 student logits), and
``grad`` a new buffer in the student's dtype: the gradient of the per-row loss
times ``grad_scale``, a 0-dim tensor on the student's device (None = 1) that a
kernel reads on the device and applies before rounding to that dtype. With
``need_grad=False`` a backend runs no gradient pass, allocates no N×C buffer and
returns None. The teacher may have level stride 0 (one head used at L temperatures):
a backend reads such a view in place. Kernel modules are imported lazily, so a
missing compiler or Triton only matters to the backend that needs it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._jit import MAX_LEVELS as _KERNEL_MAX_LEVELS  # per-level constants live in a fixed-size struct

logger = logging.getLogger("moekd_kernels")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                      # module holding ``forward`` and ``unavailable_reason``
    devices: Tuple[str, ...]         # device types the backend runs on
    description: str
    max_levels: Optional[int] = None  # teacher levels the kernel holds (None: any)
    top_k_teacher: bool = False       # reads a teachers.TopKRows teacher
    # "module:attribute" of its phase functions over a class slice (phases.TorchPhases is the
    # contract), which the vocab-parallel path runs; None: it takes no process_group.
    phases: Optional[str] = None

    def supports_levels(self, num_levels: int) -> bool:
        return self.max_levels is None or num_levels <= self.max_levels

    def supports(self, num_levels: int, top_k_teacher: bool) -> bool:
        return self.supports_levels(num_levels) and (self.top_k_teacher or not top_k_teacher)

    def load(self):
        return importlib.import_module(self.module, __package__)

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        """None when usable for tensors on ``device_type``, else why not."""
        if device_type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, not {device_type}"
        try:
            module = self.load()
        except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
            return f"backend {self.name!r} could not be imported: {exc}"
        return module.unavailable_reason(device_type)

    def forward(self, *args):
        return self.load().forward(*args)

    def load_phases(self):
        module, attribute = self.phases.split(":")
        return getattr(importlib.import_module(module, __package__), attribute)


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", ".reference", ("cpu", "cuda", "meta"),
                "pure PyTorch closed form; any device", top_k_teacher=True, phases=".phases:PYTORCH"),
        Backend("cpu", ".cpu_backend", ("cpu",),
                "fused C++/OpenMP kernel, JIT-built with ninja", max_levels=_KERNEL_MAX_LEVELS,
                top_k_teacher=True, phases=".cpu_backend:phases"),
        Backend("triton", ".triton_backend", ("cuda", "cpu"),
                "fused Triton kernel; CPU tensors only under TRITON_INTERPRET=1", top_k_teacher=True,
                phases=".triton_backend:phases"),
        Backend("cuda", ".cuda_backend", ("cuda",),
                "fused CUDA C++ kernel, JIT-built with nvcc", max_levels=_KERNEL_MAX_LEVELS),
    )
}

# backend="auto": the first available entry for the tensors' device type, fastest first.
# On an H100 (benchmarks/RESULTS.md, N=16384, bf16 and fp32, C from 4096 to 262144)
# "cuda" was faster than "triton" at every shape but one tie (fp32, C=32768).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
_FALLBACK = "reference"


def backend_names() -> Tuple[str, ...]:
    return ("auto",) + tuple(BACKENDS)


def check_backend_name(name) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def auto_backend(device_type: str, num_levels: int = 1, top_k_teacher: bool = False) -> str:
    """The backend ``"auto"`` picks for ``device_type``: fastest available first.

    Decided once per (device type, level count, teacher kind) and process, and logged;
    falling back to the reference past an unavailable kernel warns once, with the reason.
    """
    skipped = []
    no_top_k = []  # faster backends passed over because they cannot read a top-k teacher
    chosen = _FALLBACK
    for candidate in AUTO_ORDER.get(device_type, (_FALLBACK,)):
        backend = BACKENDS[candidate]
        if not backend.supports(num_levels, top_k_teacher):
            if top_k_teacher and not backend.top_k_teacher:
                no_top_k.append(repr(candidate))
            continue
        reason = backend.unavailable_reason(device_type)
        if reason is None:
            chosen = candidate
            break
        skipped.append(reason)
    if skipped and chosen == _FALLBACK:
        warnings.warn(
            f"moekd_kernels: backend='auto' falls back to 'reference' on {device_type}: "
            + "; ".join(skipped),
            RuntimeWarning,
            stacklevel=2,
        )
    teacher = ""
    if top_k_teacher:
        teacher = " and a top-k teacher" + (f" ({', '.join(no_top_k)} cannot read one)" if no_top_k else "")
    logger.info("moekd_kernels: backend='auto' uses %r for %s tensors with %d level(s)%s",
                chosen, device_type, num_levels, teacher)
    return chosen


def describe_auto() -> str:
    """E.g. "cpu: 'cpu', cuda: 'triton'" for the device types present in this process."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return ", ".join(f"{d}: {auto_backend(d)!r}" for d in device_types)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    num_levels: int = 1, top_k_teacher: bool = False) -> str:
    """Turn "auto" into a concrete backend for ``device``; check explicit choices."""
    check_backend_name(name)
    return _resolve(name, torch.device(device).type, dtype, num_levels, top_k_teacher)


# torch.compile runs this once while tracing and keeps the name as a constant:
# tracing into it would reach importlib and lru_cache, both graph breaks.
@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, dtype: torch.dtype, num_levels: int,
             top_k_teacher: bool) -> str:
    if name == "auto":
        # The kernels accumulate in float32; float64 callers want float64 all the way.
        return "reference" if dtype == torch.float64 else auto_backend(device_type, num_levels,
                                                                         top_k_teacher)
    error = _choice_error(name, device_type, num_levels, top_k_teacher)
    if error is not None:
        raise error
    return name


def _choice_error(name: str, device_type: str, num_levels: int, top_k_teacher: bool) -> Optional[Exception]:
    """Why the explicitly chosen backend ``name`` cannot take these inputs, or None."""
    backend = BACKENDS[name]
    if top_k_teacher and not backend.top_k_teacher:
        takers = [n for n, b in BACKENDS.items() if b.top_k_teacher]
        return ValueError(f"backend={name!r} does not take a TopKTeacher; use backend='auto' or one of "
                          f"{takers}")
    if not backend.supports_levels(num_levels):
        return ValueError(
            f"teacher_logits has L={num_levels} levels, but backend={name!r} supports at most "
            f"{backend.max_levels}; use backend='auto', 'triton' or 'reference'"
        )
    reason = _unavailable_reason(name, device_type)
    if reason:
        return RuntimeError(f"backend={name!r} is not available: {reason}")
    return None


# A constant while torch.compile traces, like _resolve ("" when available).
@torch.compiler.assume_constant_result
def _unavailable_reason(name: str, device_type: str) -> str:
    return BACKENDS[name].unavailable_reason(device_type) or ""


def sharded_backend_names() -> Tuple[str, ...]:
    """The backend names a process_group call takes: those with phase functions, and "auto"."""
    return ("auto",) + tuple(n for n, b in BACKENDS.items() if b.phases is not None)


def resolve_sharded_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                            num_levels: int = 1, top_k_teacher: bool = False) -> str:
    """``resolve_backend`` for the vocab-parallel path: "auto" is the first entry of
    AUTO_ORDER with phase functions that is available and takes the inputs.

    Raises ValueError only (an unavailable kernel too), and never inside a function that
    torch.compile takes as a constant: the caller turns the error into one that every
    rank of the group raises."""
    check_backend_name(name)
    if name not in sharded_backend_names():
        raise ValueError(f"backend={name!r} does not take a process_group; use one of "
                         f"{sharded_backend_names()}")
    device_type = torch.device(device).type
    if name != "auto":
        error = _choice_error(name, device_type, num_levels, top_k_teacher)
        if error is not None:
            raise ValueError(str(error))
        return name
    if dtype == torch.float64:
        return _FALLBACK
    for candidate in AUTO_ORDER.get(device_type, ()):
        backend = BACKENDS[candidate]
        if (backend.phases is not None and backend.supports(num_levels, top_k_teacher)
                and not _unavailable_reason(candidate, device_type)):
            return candidate
    return _FALLBACK


def available_backends(device_type: str = "cpu") -> Tuple[str, ...]:
    """Names of the backends usable for tensors on ``device_type``."""
    return tuple(n for n, b in BACKENDS.items() if b.unavailable_reason(device_type) is None)

