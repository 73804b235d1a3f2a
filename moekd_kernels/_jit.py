"""What the compiled backends (cpu_backend, cuda_backend) share: building their
extensions from csrc/ on first use, with a cache across processes, loading them
once per process, the arguments their bindings take, and the limits their
kernels put on the inputs.

Each backend describes its extension with a ``JitExtension`` (its files), builds
it with its own flags, and holds the once-per-process result in a
``LoadedExtension``.

Builds go to ~/.cache/moekd_kernels (or ``$MOEKD_KERNELS_CACHE``), into a folder
the backend names by ``environment_key`` of whatever shapes the binary besides
the sources (flags, torch/Python versions, the CPU or GPU architecture), so one
cache serves several machines and versions side by side. Next to the library, a
stamp file holds the hash of the sources it was built from: while it matches, a
new process imports the library itself and skips torch's build step (in a fresh
process that always rewrites build.ninja and runs ninja under a file lock); a
changed source rebuilds, and ninja recompiles only what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

from .options import MoEKDOptions

_STAMP = "sources.sha256"

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}
MAX_LEVELS = 8  # moekd::kMaxLevels in csrc/common/moekd_math.h


def check_kernel_inputs(backend: str, student: torch.Tensor, teacher: torch.Tensor,
                        teacher_dtypes: Sequence[torch.dtype] = KERNEL_DTYPES,
                        device_types: Optional[Sequence[str]] = None,
                        max_levels: Optional[int] = MAX_LEVELS) -> None:
    """What a kernel takes beyond what options.flatten_inputs checks for every backend.

    ``device_types``: the devices the kernel runs on; by default the one the backend is
    named after (cpu, cuda). ``max_levels`` None: any number of levels.
    """
    if student.dim() != 2 or teacher.dim() != 3:
        raise ValueError(
            f"backend '{backend}' takes student (N, C) and teacher (L, N, C), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"student_logits must be float32, bfloat16 or float16 for backend '{backend}', got "
            f"{student.dtype} (backend='auto' or 'reference' handles float64)"
        )
    if teacher.dtype not in teacher_dtypes:
        names = [DTYPE_NAMES[d] for d in teacher_dtypes]
        raise TypeError(
            f"teacher_logits must be {', '.join(names[:-1])} or {names[-1]} for backend '{backend}', "
            f"got {teacher.dtype}"
        )
    if max_levels is not None and teacher.shape[0] > max_levels:
        raise ValueError(
            f"teacher_logits has L={teacher.shape[0]} levels; backend '{backend}' supports at most "
            f"{max_levels} (use backend='reference' for more)"
        )
    devices = (backend,) if device_types is None else tuple(device_types)
    if student.device.type not in devices or teacher.device != student.device:
        names = " or ".join(d.upper() for d in devices)
        raise ValueError(f"backend '{backend}' takes {names} tensors (student and teacher on one device), "
                         f"got {student.device} and {teacher.device}")


def kernel_options(opts: MoEKDOptions) -> tuple:
    """The options as both bindings take them after (student, teacher, target):
    per-level temperatures, expert strengths and level weights, then gate weight,
    expert weight and ignore_index."""
    return (list(opts.temperatures), list(opts.expert_strengths), list(opts.level_weights),
            float(opts.gate_weight), float(opts.expert_weight), int(opts.ignore_index))


def cache_root() -> Path:
    root = os.environ.get("MOEKD_KERNELS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moekd_kernels"


def environment_key(*parts) -> str:
    """A short hash of everything besides the sources that changes the built library."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def import_built(name: str, build_dir: Path):
    """The already-built module, or None when no candidate file loads."""
    for path in sorted(build_dir.glob(f"{name}.*so")) + sorted(build_dir.glob(f"{name}.pyd")):
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except Exception:  # noqa: BLE001 - stale or half-written: try the next, else rebuild
            continue
    return None


# torch.utils.cpp_extension guards a build folder with this file and waits, without
# end, for as long as it exists; a process killed mid-build leaves it behind.
_TORCH_LOCK = "lock"


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Holds an OS file lock on ``build_dir`` for one build, and clears a ``lock`` file
    that torch left there: under our lock no other process of this package is
    building, so such a file belongs to a build that died (seen on a GPU machine: a
    process killed by a timeout during its first build made every later one hang).
    The OS releases the lock with its process, so it never goes stale itself.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own file lock is the only guard there
        yield
        return
    with open(build_dir / ".moekd_build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            torch_lock = build_dir / _TORCH_LOCK
            if torch_lock.exists():
                print(f"moekd_kernels: removing {torch_lock}, left by an interrupted build",
                      file=sys.stderr, flush=True)
                torch_lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class JitExtension:
    """One extension: its files under csrc/ and what messages call it."""

    label: str                 # e.g. "the C++ CPU kernel"
    sources: Tuple[str, ...]   # compiled; paths relative to csrc/
    headers: Tuple[str, ...]   # only included, but an edit to them must rebuild too
    marker: str                # the file that tells csrc/ apart from other folders

    def csrc_dir(self) -> Path:
        # csrc/ sits inside the package in a wheel and next to it in a checkout.
        here = Path(__file__).resolve().parent
        for candidate in (here / "csrc", here.parent / "csrc"):
            if (candidate / self.marker).is_file():
                return candidate
        raise FileNotFoundError(f"the sources of {self.label} (csrc/{self.marker}) are not next to {here}")

    def sources_key(self, csrc: Path) -> str:
        h = hashlib.sha256()
        for rel in self.sources + self.headers:
            h.update(rel.encode())
            h.update((csrc / rel).read_bytes())
        return h.hexdigest()

    def build(self, csrc: Path, build_dir: Path, name: str, target: str = "", **load_args):
        """Import ``name`` from ``build_dir`` if it was built from these sources, else build it.

        ``load_args`` go to torch.utils.cpp_extension.load; ``target`` ends the
        line printed while building (e.g. " for sm_90").
        """
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        stamp = build_dir / _STAMP
        key = self.sources_key(csrc)

        def built():
            fresh = stamp.is_file() and stamp.read_text().strip() == key
            return import_built(name, build_dir) if fresh else None

        module = built()
        if module is not None:
            return module
        with build_lock(build_dir):
            module = built()  # another process may have built it while this one waited
            if module is not None:
                return module
            print(f"moekd_kernels: building {self.label}{target} (once per machine and version; "
                  f"about 1-2 minutes on a 2-core machine)...", file=sys.stderr, flush=True)
            started = time.monotonic()
            # load() appends to the flag lists it is given: hand it copies, not our constants.
            load_args = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in load_args.items()}
            module = load(name=name, sources=[str(csrc / s) for s in self.sources],
                          extra_include_paths=[str(csrc)], build_directory=str(build_dir), verbose=False,
                          **load_args)
            # Write then rename: a process that reads the stamp never sees half of it.
            partial = stamp.with_name(f"{stamp.name}.{os.getpid()}")
            partial.write_text(key)
            os.replace(partial, stamp)
            print(f"moekd_kernels: built {self.label} in {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
        return module

    def failure_message(self, exc: BaseException, limit: int = 3000) -> str:
        # The compiler's error is at the end of its output: keep the tail.
        text = str(exc).strip() or type(exc).__name__
        if len(text) > limit:
            text = "..." + text[-limit:]
        return f"{self.label} could not be built ({type(exc).__name__}): {text}"

    def try_build(self, build: Callable[[], object]) -> Tuple[Optional[object], Optional[str]]:
        """(module, None), or (None, why not): a kernel that does not build is unavailable, not an error."""
        try:
            return build(), None
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable, because ..."
            return None, self.failure_message(exc)


class LoadedExtension:
    """One extension's build, at most once per process: ``load()`` gives (module, None)
    or (None, why not). A failed build stays failed for the process (the compiler would
    say the same again); a ``precheck`` that names a reason (no GPU, say) is not cached.
    """

    def __init__(self, kernel: JitExtension, build: Callable[[], object],
                 precheck: Optional[Callable[[], Optional[str]]] = None):
        self.kernel = kernel
        self._build = build
        self._precheck = precheck
        self._lock = threading.Lock()
        self.module = None
        self.failure: Optional[str] = None

    def load(self) -> Tuple[Optional[object], Optional[str]]:
        with self._lock:
            if self.module is None and self.failure is None:
                reason = self._precheck() if self._precheck is not None else None
                if reason is not None:
                    return None, reason
                self.module, self.failure = self.kernel.try_build(self._build)
            return self.module, self.failure

    def require(self, backend: str):
        """The module, or RuntimeError naming the backend and why it is not available."""
        module, failure = self.load()
        if module is None:
            raise RuntimeError(f"backend='{backend}' is not available: {failure}")
        return module
