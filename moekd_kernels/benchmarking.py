"""Speed measurement shared by ``python -m moekd_kernels bench``, ``benchmarks/`` and
``benchmarks/gpu_check.py``.

What is compared, always as one forward + backward (the gradient w.r.t. the
student logits):

- every usable backend of this package, through the public ``fused_moe_kd_loss``;
- ``eager_moekd``: MoE-KD as a user writes it in eager PyTorch, with autograd.
  It does not use ``moekd_kernels.reference``; the tests check it against the package;
- ``compiled_moekd``: ``torch.compile`` of exactly ``eager_moekd``;
- ``eager_classic_kd``: Hinton KD from ``F.kl_div`` + ``F.cross_entropy``, which is
  what MoE-KD replaces;
- ``liger_classic_kd``: the same KD from Liger-Kernel's Triton losses, when it imports.

Throughput uses one bytes model for every implementation, the minimum traffic of
the fused kernel (read s and every t_ℓ, write the gradient):
``N·C·(bytes(s) + L·bytes(t) + bytes(s))``. For the baselines it is an effective
rate, comparable across implementations, not the traffic they really move.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# The package defaults (docs/math.md, API), used by every implementation so that they all compute
# the same thing; classic KD reads the temperature and the two term weights.
DEFAULT_OPTIONS: Dict[str, float] = {
    "temperature": 4.0,
    "expert_strength": 2.0,
    "gate_weight": 1.0,
    "expert_weight": 1.0,
}

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Normwise relative-error bounds against a float64 evaluation, by the student's dtype: the
# one table that benchmarks/gpu_check.py and tests/oracle.py share (the tests refine the
# gradient check element by element, tests/oracle.py).
TOLERANCE: Dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-5,
                                       torch.bfloat16: 3e-2, torch.float16: 3e-2}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the finite entries of ``expected``, in float64;
    inf when the non-finite entries (NaN, ±inf) of the two differ."""
    actual = actual.detach().double().cpu().reshape(-1)
    expected = expected.detach().double().cpu().reshape(-1)
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return math.inf
    if not torch.equal(expected[~finite].isnan(), actual[~finite].isnan()):
        return math.inf
    if not torch.equal(expected[~finite & ~expected.isnan()], actual[~finite & ~actual.isnan()]):
        return math.inf
    denom = expected[finite].norm()
    diff = (actual[finite] - expected[finite]).norm()
    return float(diff / denom) if denom > 0 else float(diff)

BASELINES = ("eager_moekd", "compiled_moekd", "eager_classic_kd", "liger_classic_kd")
# Backends whose kernels only run through an interpreter on this device type: far too
# slow to be worth timing, so benchmarks leave them out (the tests cover them).
INTERPRETED = {"cpu": ("triton",)}


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    rows: int          # N
    classes: int       # C
    levels: int = 1    # L

    @property
    def label(self) -> str:
        level = f" L={self.levels}" if self.levels != 1 else ""
        return f"N={self.rows} C={self.classes}{level}"

    def with_rows(self, rows: int) -> "Shape":
        return Shape(rows, self.classes, self.levels)


# N·C ≈ 4M elements: about 0.3 s for eager MoE-KD in fp32 on 2 cores (the slowest
# implementation), so every case takes well under a second.
CPU_SHAPES = (Shape(4096, 1024), Shape(128, 32768), Shape(32, 131072))
# The GPU shapes of the project's targets (N=16384, LLM-sized vocabularies).
GPU_SHAPES = tuple(Shape(16384, c) for c in (4096, 32768, 131072, 262144))
QUICK_CPU_SHAPES = (Shape(1024, 1024), Shape(32, 32768))
QUICK_GPU_SHAPES = (Shape(16384, 32768), Shape(16384, 131072))


def parse_shapes(spec: str) -> Tuple[Shape, ...]:
    """``"cpu"``, ``"gpu"`` or a list like ``"1024x32768,32x131072x3"`` (N x C [x L])."""
    presets = {"cpu": CPU_SHAPES, "gpu": GPU_SHAPES, "quick-cpu": QUICK_CPU_SHAPES,
               "quick-gpu": QUICK_GPU_SHAPES}
    spec = spec.strip().lower()
    if spec in presets:
        return presets[spec]
    shapes = []
    for item in spec.split(","):
        parts = item.strip().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape must look like NxC or NxCxL with positive integers, got {item!r}")
        shapes.append(Shape(*(int(p) for p in parts)))
    return tuple(shapes)


def suite_config(env_value: Optional[str]) -> Tuple[Tuple[Shape, ...], str]:
    """The benchmark suite's (shapes, device) from ``MOEKD_BENCH_SHAPES``.

    Unset or ``cpu``: the CPU shapes on the CPU. ``gpu``: the GPU shapes on CUDA.
    Anything else is a shape list (see ``parse_shapes``), on CUDA when available.
    ``MOEKD_BENCH_DEVICE`` overrides the device.
    """
    spec = (env_value or "cpu").strip().lower()
    shapes = parse_shapes(spec)
    if spec in ("cpu", "quick-cpu"):
        device = "cpu"
    elif spec in ("gpu", "quick-gpu"):
        device = "cuda"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return shapes, os.environ.get("MOEKD_BENCH_DEVICE", device)


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: Shape, dtype: torch.dtype, device="cpu", *, teacher_dtype=None,
                seed: int = 0, ignore_frac: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Random student (N, C), teacher (L, N, C) and target (N,), logits of scale ~3.

    Drawn directly on ``device`` in the final dtype, so that the big GPU shapes never
    hold a float32 copy. Timing runs use no ignored rows: a fused kernel skips them,
    which would flatter its throughput.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, c, levels = shape.rows, shape.classes, shape.levels
    student = torch.randn(n, c, generator=gen, device=device, dtype=dtype).mul_(3)
    teacher = torch.randn(levels, n, c, generator=gen, device=device,
                          dtype=teacher_dtype or dtype).mul_(3)
    target = torch.randint(0, c, (n,), generator=gen, device=device)
    if ignore_frac > 0:
        drop = torch.rand(n, generator=gen, device=device) < ignore_frac
        target = target.masked_fill(drop, -100)
    return student, teacher, target


# --------------------------------------------------------------------------- baselines


def _levels(value, num_levels: int) -> List[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * num_levels


def _teacher_levels(student: Tensor, teacher: Tensor, temperature, level_weights):
    """teacher as (L, ..., C), one τ per level, and the level weights normalised to sum 1."""
    if teacher.dim() == student.dim():
        teacher = teacher.unsqueeze(0)
    num_levels = teacher.shape[0]
    weights = _levels(level_weights if level_weights is not None else 1.0, num_levels)
    return teacher, _levels(temperature, num_levels), [w / sum(weights) for w in weights]


def eager_moekd(student: Tensor, teacher: Tensor, target: Tensor, *, temperature=4.0,
                expert_strength=2.0, level_weights=None, gate_weight=1.0, expert_weight=1.0,
                ignore_index: int = -100) -> Tensor:
    """MoE-KD, mean over non-ignored rows, written the obvious way in eager PyTorch.

    The E-step runs under ``no_grad``; the M-step loss is built from log-softmaxes and
    ``autograd`` gives its gradient. Every step materialises (N, C) float32 tensors,
    which is the cost the fused kernels remove. student (N, C); teacher (N, C) or (L, N, C).
    """
    # As HF trainers do: softmaxes of low-precision logits in float32 (float64 stays float64).
    s = student.to(torch.promote_types(student.dtype, torch.float32))
    teacher, taus, weights = _teacher_levels(s, teacher, temperature, level_weights)
    betas = _levels(expert_strength, teacher.shape[0])

    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
    log_sigma = F.log_softmax(s, dim=-1)

    with torch.no_grad():  # E-step: responsibilities r_ℓc, constants for the M-step
        sigma = log_sigma.exp()
        u = []
        for t, tau, beta, w in zip(teacher, taus, betas, weights):
            u_l = w * F.softmax(t.to(s.dtype) / tau, dim=-1) / (1 + math.expm1(beta) * sigma)
            u.append(u_l.scatter(1, y, u_l.gather(1, y) * math.exp(beta)))
        G = sum(u_l.sum(-1, keepdim=True) for u_l in u)
        r = [u_l / G for u_l in u]

    # M-step objective: Σ r log p_ℓc(y) and Σ_ℓ τ² Σ_c r log q_ℓc, differentiable in s.
    sigma = log_sigma.exp()
    expert = log_sigma.gather(1, y).squeeze(1)
    gate = torch.zeros_like(expert)
    for r_l, tau, beta in zip(r, taus, betas):
        log_D = torch.log1p(math.expm1(beta) * sigma)
        expert = expert + beta * r_l.gather(1, y).squeeze(1) - (r_l * log_D).sum(-1)
        gate = gate + tau * tau * (r_l * F.log_softmax(s / tau, dim=-1)).sum(-1)
    rows = -(expert_weight * expert + gate_weight * gate)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return rows.sum() / valid.sum().clamp_min(1)


def eager_classic_kd(student: Tensor, teacher: Tensor, target: Tensor, *, temperature=4.0,
                     gate_weight=1.0, expert_weight=1.0, ignore_index: int = -100,
                     level_weights=None, **_unused) -> Tensor:
    """Hinton KD, λ_e·CE(s, y) + λ_g·τ²·KL(π ‖ q) per row, averaged over non-ignored rows.

    With several teacher levels, the level-weighted sum of their KL terms. Extra MoE-KD
    options (``expert_strength``) are accepted and have no meaning here.
    """
    s = student.to(torch.promote_types(student.dtype, torch.float32))
    teacher, taus, weights = _teacher_levels(s, teacher, temperature, level_weights)
    valid = target != ignore_index
    num_valid = valid.sum().clamp_min(1)
    loss = expert_weight * F.cross_entropy(s, target, ignore_index=ignore_index)
    for t, tau, w in zip(teacher, taus, weights):
        kl_rows = F.kl_div(F.log_softmax(s / tau, dim=-1), F.log_softmax(t.to(s.dtype) / tau, dim=-1),
                           reduction="none", log_target=True).sum(-1)
        kl = torch.where(valid, kl_rows, torch.zeros_like(kl_rows)).sum() / num_valid
        loss = loss + gate_weight * w * tau * tau * kl
    return loss


_compiled_eager_moekd = None


def compiled_moekd(student: Tensor, teacher: Tensor, target: Tensor, **options) -> Tensor:
    """``torch.compile(eager_moekd, dynamic=False)``: one static-shape graph per shape.

    The compile happens on the first call of each new shape/dtype/options (timed apart
    from the steady state by the callers); later calls reuse it.
    """
    global _compiled_eager_moekd
    if _compiled_eager_moekd is None:
        # Every benchmarked shape and dtype is its own static graph; the default limit
        # of 8 recompilations would silently drop back to eager past the 8th.
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _compiled_eager_moekd = torch.compile(eager_moekd, dynamic=False)
    return _compiled_eager_moekd(student, teacher, target, **options)


def liger_unavailable_reason() -> Optional[str]:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return f"liger_kernel does not import: {type(exc).__name__}: {exc}"
    return None


def make_liger_classic_kd() -> Callable[..., Tensor]:
    """Classic KD from Liger-Kernel's pieces: LigerCrossEntropyLoss + LigerKLDIVLoss.

    This is the fastest classic KD a user can assemble from Liger without the fused
    linear layer. Two differences from ``eager_classic_kd``, neither of which matters to
    the timed inputs (no ignored rows): Liger's KL has no ``ignore_index`` (batchmean over
    all rows), and its cross-entropy writes its gradient into the logits buffer it is
    given (to save memory), so the student logits are overwritten: callers run it last,
    on its own copy.
    """
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger_classic_kd(student, teacher, target, *, temperature=4.0, gate_weight=1.0,
                         expert_weight=1.0, ignore_index=-100, level_weights=None, **_unused):
        teacher, taus, weights = _teacher_levels(student, teacher, temperature, level_weights)
        ce = LigerCrossEntropyLoss(ignore_index=ignore_index)
        loss = 0.0
        for t, tau, w in zip(teacher, taus, weights):
            log_q = F.log_softmax(student.float() / tau, dim=-1)
            log_pi = F.log_softmax(t.float() / tau, dim=-1)
            loss = loss + gate_weight * w * tau * tau * kl(log_q, log_pi)
        return loss + expert_weight * ce(student, target)

    return liger_classic_kd


# --------------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Impl:
    name: str
    loss_fn: Callable[..., Tensor]   # (student, teacher, target, **options) -> scalar loss
    is_backend: bool

    @property
    def shrinkable(self) -> bool:
        """May run on fewer rows when out of memory: the unfused PyTorch implementations,
        whose N×C temporaries are what they are; never a fused kernel."""
        return not self.is_backend or self.name == "reference"


def package_loss(backend: str) -> Callable[..., Tensor]:
    from .loss import fused_moe_kd_loss

    def loss_fn(student, teacher, target, **options):
        return fused_moe_kd_loss(student, teacher, target, backend=backend, **options)

    loss_fn.__name__ = f"fused_moe_kd_loss[{backend}]"
    return loss_fn


def benchmark_backends(device_type: str, *, include_interpreted: bool = False) -> Tuple[str, ...]:
    """The package's usable backends on ``device_type`` (discovered, never assumed)."""
    from .backends import available_backends

    skip = () if include_interpreted else INTERPRETED.get(device_type, ())
    return tuple(b for b in available_backends(device_type) if b not in skip)


def implementations(device_type: str, *, backends: Optional[Sequence[str]] = None,
                    baselines: Sequence[str] = BASELINES, log=print,
                    include_interpreted: bool = False) -> List[Impl]:
    """The eager/compiled/classic baselines, then the package backends, then Liger.

    Baselines come first so that each backend's ratios are known when it is measured;
    Liger comes last because it overwrites the student logits it is given.
    """
    if backends is None:
        backends = benchmark_backends(device_type, include_interpreted=include_interpreted)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; expected names from {BASELINES}")
    impls = [Impl(name, globals()[name], False) for name in baselines if name != "liger_classic_kd"]
    impls += [Impl(b, package_loss(b), True) for b in backends]
    if "liger_classic_kd" in baselines:
        reason = liger_unavailable_reason()
        if reason is None:
            impls.append(Impl("liger_classic_kd", make_liger_classic_kd(), False))
        else:
            log(f"[bench] liger_classic_kd left out: {reason}")
    return impls


def make_step(loss_fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, target: Tensor,
              options: Optional[Dict] = None) -> Callable[[], Tensor]:
    """One training step's loss work: forward, then the gradient w.r.t. the student.

    ``autograd.grad`` rather than ``backward()`` so that repeated calls never
    accumulate into ``.grad`` (an extra N×C add that is not part of the loss).
    """
    leaf = student.detach().requires_grad_(True)
    options = dict(DEFAULT_OPTIONS if options is None else options)

    def step() -> Tensor:
        loss = loss_fn(leaf, teacher, target, **options)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    return step


# --------------------------------------------------------------------------- bytes and timing


def moekd_bytes(rows: int, classes: int, levels: int, student_dtype: torch.dtype,
                teacher_dtype: Optional[torch.dtype] = None) -> int:
    """Minimum traffic of one fused fwd+bwd: read s and t_ℓ, write the gradient (in s's dtype)."""
    bytes_s = torch.empty((), dtype=student_dtype).element_size()
    bytes_t = torch.empty((), dtype=teacher_dtype or student_dtype).element_size()
    return rows * classes * (bytes_s + levels * bytes_t + bytes_s)


def gb_per_s(num_bytes: float, seconds: float) -> float:
    return num_bytes / seconds / 1e9 if seconds > 0 else float("nan")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    reps: int
    times_s: List[float] = field(default_factory=list)


def time_fn(fn: Callable[[], object], device="cpu", *, warmup: int = 2, min_reps: int = 5,
            max_reps: int = 100, target_s: float = 1.0) -> Timing:
    """Median wall time of ``fn()`` after ``warmup`` calls.

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each
    call, read after one final synchronisation, so host overhead between calls hides
    behind the queue as it does in training. The repetition count aims at ``target_s``
    of measured time, within [min_reps, max_reps].
    """
    device = torch.device(device)
    estimate = None
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, target_s / max(estimate, 1e-6))))
    times: List[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), reps, times)


def copy_bandwidth(device="cpu", num_bytes: Optional[int] = None, reps: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written.

    The buffer is far larger than any cache (1 GiB on CUDA, 256 MiB on CPU), so this is
    the memory bandwidth a streaming kernel can hope for on this machine.
    """
    device = torch.device(device)
    if num_bytes is None:
        num_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=3, min_reps=reps, max_reps=reps)
    del src, dst
    return gb_per_s(2 * num_bytes, timing.median_s)


def peak_extra_bytes(fn: Callable[[], object], device) -> Optional[int]:
    """Peak CUDA memory one call allocates beyond what was live before it (the gradient
    it returns included). None off CUDA: CPU peak memory needs a fresh process."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


# --------------------------------------------------------------------------- results and tables


@dataclass
class Result:
    impl: str
    dtype: str
    rows: int                       # N actually run (a baseline may fall back to fewer rows)
    classes: int
    levels: int
    median_ms: float
    gbps: float
    reps: int = 0
    compile_s: Optional[float] = None   # first call minus a steady call (compiled_moekd)
    peak_extra_gb: Optional[float] = None
    note: str = ""

    @property
    def key(self) -> Tuple[str, int, int]:
        return (self.dtype, self.classes, self.levels)

    def as_dict(self) -> Dict:
        return asdict(self)


def speedups(results: Iterable[Result]) -> Dict[Tuple[str, Tuple], Dict[str, float]]:
    """{(impl, key): {"eager_moekd": ×, "compiled_moekd": ×, "eager_classic_kd": ×}}.

    Ratios of throughput (bytes per second), so a baseline run on fewer rows (out of
    memory at the full N) still compares per row. > 1 means faster than the baseline.
    """
    results = list(results)
    base = {(r.impl, r.key): r.gbps for r in results if r.impl in BASELINES}
    out = {}
    for r in results:
        out[(r.impl, r.key)] = {
            b: r.gbps / base[(b, r.key)] for b in ("eager_moekd", "compiled_moekd", "eager_classic_kd")
            if (b, r.key) in base and base[(b, r.key)] > 0
        }
    return out


def format_gbps(value: float) -> str:
    """GB/s to three significant figures or more: CPU cases run well under 1 GB/s."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(results: Sequence[Result], copy_gbps: Optional[float] = None) -> str:
    """One row per (dtype, shape, implementation), grouped by dtype and shape."""
    ratio = speedups(results)
    head = ["dtype", "N", "C", "L", "implementation", "ms", "GB/s"]
    if copy_gbps:
        head.append("% copy")
    head += ["×eager", "×compiled", "×classic KD", "peak extra GB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Within a shape: the MoE-KD baselines, the classic-KD ones, then the package backends.
    order = {"eager_moekd": 0, "compiled_moekd": 1, "eager_classic_kd": 2, "liger_classic_kd": 3}
    dtype_order = {name: i for i, name in enumerate(DTYPES)}
    for r in sorted(results, key=lambda r: (dtype_order.get(r.dtype, 9), r.classes, r.levels,
                                            order.get(r.impl, 4), r.impl)):
        x = ratio.get((r.impl, r.key), {})
        cells = [r.dtype, str(r.rows), str(r.classes), str(r.levels), r.impl,
                 _fmt(r.median_ms, ".3f"), format_gbps(r.gbps)]
        if copy_gbps:
            cells.append(_fmt(100 * r.gbps / copy_gbps, ".0f"))
        cells += [_fmt(x.get("eager_moekd"), ".2f"), _fmt(x.get("compiled_moekd"), ".2f"),
                  _fmt(x.get("eager_classic_kd"), ".2f"), _fmt(r.peak_extra_gb, ".2f")]
        note = r.note
        if r.compile_s is not None:
            note = (note + "; " if note else "") + f"compile {r.compile_s:.1f} s"
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class PreparedStep:
    step: Callable[[], Tensor]   # one fwd+bwd, already run once
    shape: Shape                 # the shape it runs (fewer rows after an OOM fallback)
    first_call_s: float          # the first call: includes compilation and JIT builds
    num_bytes: int               # bytes model for ``shape``
    note: str = ""


def prepare_step(impl: Impl, shape: Shape, dtype: torch.dtype, device, *, inputs=None,
                 min_rows: int = 1, log=print) -> PreparedStep:
    """Build ``impl``'s fwd+bwd step at ``shape`` and run it once (compiling, if it must).

    An unfused implementation (``Impl.shrinkable``) that runs out of memory is retried on
    half the rows, down to ``min_rows``, and the note says so: its throughput still
    compares per row. A fused backend is never shrunk: an OOM there is a finding, and raises.
    """
    device = torch.device(device)
    rows = shape.rows
    while True:
        run_shape = shape.with_rows(rows)
        if rows != shape.rows and device.type == "cuda":
            # Out of the except block, the failed attempt's tensors are garbage by now.
            torch.cuda.empty_cache()
        try:
            if inputs is not None and rows == shape.rows:
                student, teacher, target = inputs
            else:
                student, teacher, target = make_inputs(run_shape, dtype, device)
            step = make_step(impl.loss_fn, student, teacher, target)
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            first_s = time.perf_counter() - start
            break
        except Exception as exc:  # noqa: BLE001 - only OOM is retried
            if not impl.shrinkable or not _is_oom(exc) or rows // 2 < min_rows:
                raise
            log(f"[bench] {impl.name} {DTYPE_NAMES.get(dtype, dtype)} {run_shape.label}: "
                f"out of memory, retrying with N={rows // 2}")
            student = teacher = target = step = None
            rows //= 2
    num_bytes = moekd_bytes(rows, shape.classes, shape.levels, dtype, teacher.dtype)
    note = f"OOM at N={shape.rows}" if rows != shape.rows else ""
    return PreparedStep(step, run_shape, first_s, num_bytes, note)


def measure_impl(impl: Impl, shape: Shape, dtype: torch.dtype, device, *, target_s: float = 1.0,
                 min_rows: int = 1, log=print, inputs=None, memory: bool = True,
                 min_reps: int = 5) -> Result:
    """Time one implementation's fwd+bwd at ``shape`` (see ``prepare_step``).

    ``compile_s`` (compiled_moekd only) is the first call's excess over a steady call.
    """
    prepared = prepare_step(impl, shape, dtype, device, inputs=inputs, min_rows=min_rows, log=log)
    peak = peak_extra_bytes(prepared.step, device) if memory else None
    timing = time_fn(prepared.step, device, warmup=1, target_s=target_s, min_reps=min_reps)
    compile_s = None
    if impl.name == "compiled_moekd":
        compile_s = max(prepared.first_call_s - timing.median_s, 0.0)
    return Result(impl.name, DTYPE_NAMES.get(dtype, str(dtype)), prepared.shape.rows, shape.classes,
                  shape.levels, timing.median_s * 1e3, gb_per_s(prepared.num_bytes, timing.median_s),
                  timing.reps, compile_s, None if peak is None else peak / 1e9, prepared.note)


# --------------------------------------------------------------------------- CLI: python -m moekd_kernels bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--shapes", default=None,
                        help="NxC[xL],... (default: three shapes sized for the device)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="student and teacher logits dtype (default fp32)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated package backends (default: every available one)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out compiled_moekd (torch.compile takes ~10-60 s per shape on CPU)")
    parser.add_argument("--time-per-case", type=float, default=0.5,
                        help="seconds of timed calls per case (default 0.5)")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = torch.device(device).type
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = GPU_SHAPES[:3] if device_type == "cuda" else CPU_SHAPES
    dtype = DTYPES[args.dtype]
    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    baselines = [b for b in BASELINES if not (args.no_compile and b == "compiled_moekd")]
    impls = implementations(device_type, backends=backends, baselines=baselines)
    print(f"moekd_kernels bench: device={device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} implementations={[i.name for i in impls]}", flush=True)

    results: List[Result] = []
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        for impl in impls:
            label = f"{impl.name} {shape.label}"
            if impl.name == "compiled_moekd":
                print(f"  {label}: compiling...", flush=True)
            try:
                result = measure_impl(impl, shape, dtype, device, target_s=args.time_per_case,
                                      inputs=None if impl.name == "liger_classic_kd" else inputs,
                                      memory=device_type == "cuda")
            except Exception as exc:  # noqa: BLE001 - one failure must not hide the rest
                print(f"  {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            results.append(result)
            print(f"  {label}: {result.median_ms:.3f} ms, {format_gbps(result.gbps)} GB/s", flush=True)
    print()
    print(markdown_table(results))
    return 0
