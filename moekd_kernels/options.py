"""Argument checking and normalisation, shared by every backend.

Everything here runs before any kernel: a bad argument raises a ``ValueError``
or ``TypeError`` that names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence, Tuple, Union

import torch

PerLevel = Union[float, Sequence[float]]

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# exp(β) has to stay well inside float32 range: D = 1 + expm1(β)·σ and
# u_y ∝ exp(β) are formed directly. At β = 50 the responsibilities are already
# one-hot(y) to float32 precision, so larger values change nothing but overflow.
MAX_EXPERT_STRENGTH = 50.0

# The kernels hold τ, 1/τ, λ_g, λ_e (and form τ², λ_g·τ², s/τ) in float32, whose
# normal range is about [1.2e-38, 3.4e38]; τ = 1e-38 already sends s/τ to inf and
# every row to NaN, and λ_g or τ of 1e39 round to inf. The bounds keep each of those
# far from the edges, with room for the logits and the sum over rows:
#   τ in [1e-4, 1e4]:  1/τ <= 1e4, so s/τ is finite for any |s| < 3.4e34 (far beyond
#       any model's logits, and beyond float16/bfloat16 ones); τ² in [1e-8, 1e8].
#   λ_g, λ_e in [0, 1e8]: 1e8 covers λ_g = 1/τ² (forward KL at temperature τ, the
#       TRL convention) down to the smallest τ. Then λ_g·τ² <= 1e16, a gradient entry
#       is at most λ_g·τ + λ_e <= ~1e12, and a row's loss at most
#       λ_g·(τ·Δs + τ²·log C) + λ_e·(Δs + log C) for a logit spread Δs: ~1e18 for
#       Δs = 1e4 and C = 1e6, so even a sum over 1e18 rows stays finite in float32.
# Accuracy, not just finiteness: near τ = 1e4, q and π are uniform up to O(Δs/τ),
# and their difference in the gate gradient keeps about float32 ε·τ/|Δs| relative
# precision (as any float32 softmax does); the usual τ in [1, 20] is unaffected.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
MAX_TERM_WEIGHT = 1e8

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# Formatted once here: under torch.compile(dynamic=True) even these module floats are
# symbolic while tracing, and f-strings cannot format a symbolic float.
_TEMPERATURE_RANGE = f"a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
_STRENGTH_RANGE = f"a finite number in [0, {MAX_EXPERT_STRENGTH:g}]"
_TERM_WEIGHT_RANGE = f"a number in [0, {MAX_TERM_WEIGHT:g}]"


@dataclass(frozen=True)
class MoEKDOptions:
    """The hyper-parameters of one loss evaluation, normalised per level.

    ``level_weights`` are already divided by their sum.
    """

    temperatures: Tuple[float, ...]
    expert_strengths: Tuple[float, ...]
    level_weights: Tuple[float, ...]
    gate_weight: float
    expert_weight: float
    ignore_index: int

    @property
    def num_levels(self) -> int:
        return len(self.temperatures)


def _describe(value) -> str:
    """What was given, in a few words: never a whole array's repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ == "ndarray":
        return (f"a numpy.ndarray of shape {tuple(value.shape)} and dtype {value.dtype}; "
                "convert it with torch.from_numpy")
    text = repr(value)
    if len(text) > 80:
        text = text[:60] + " ... " + text[-10:]
    return f"{text} ({kind.__name__})"


def _is_symbolic(value) -> bool:
    # torch.compile(dynamic=True) hands Python numbers over as SymFloat/SymInt:
    # only comparisons and arithmetic trace on them (no math.*, no formatting).
    return isinstance(value, (torch.SymFloat, torch.SymInt))


def _as_float(name: str, value) -> float:
    if _is_symbolic(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got {_describe(value)}")
        value = value.item()
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be a finite number, got an int of {value.bit_length()} bits") from None


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() > 0)


def _per_level(name: str, value, num_levels: int) -> Tuple[float, ...]:
    """One float for every level, or one value per level."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != num_levels:
            raise ValueError(
                f"{name} must be one float or a sequence of one value per level "
                f"(L={num_levels}), got a sequence of length {len(value)}"
            )
        return tuple(_as_float(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (_as_float(name, value),) * num_levels


def option_levels(temperature, expert_strength, level_weights) -> Optional[int]:
    """The level count L the per-level option sequences give, or None when all are scalars.

    With a teacher of the student's shape, L > 1 means L levels of the same teacher logits.
    """
    lengths = [(name, len(value)) for name, value in (("temperature", temperature),
                                                       ("expert_strength", expert_strength),
                                                       ("level_weights", level_weights))
               if _is_sequence(value)]
    for name, length in lengths[1:]:
        if length != lengths[0][1]:
            raise ValueError(
                f"{name} must have one value per level like {lengths[0][0]} "
                f"(L={lengths[0][1]}), got a sequence of length {length}"
            )
    return lengths[0][1] if lengths else None


def _check_range(name: str, values: Sequence[float], *, low: float, low_inclusive: bool,
                 high: float = math.inf, expected: str) -> None:
    for i, v in enumerate(values):
        # Comparisons only, so symbolic floats trace; NaN fails each of them, and
        # v < inf (or v <= a finite high) rejects +inf.
        above = v >= low if low_inclusive else v > low
        below = v <= high if high < math.inf else v < math.inf
        if not (above and below):
            label = name if len(values) == 1 else f"{name}[{i}]"
            raise ValueError(f"{label} must be {expected}, got {v!r}")


def _normalise(weights: Tuple[float, ...]) -> Tuple[float, ...]:
    """w / Σw, exactly rounded, for any finite weights (no overflow for huge ones)."""
    if any(_is_symbolic(w) for w in weights):
        total = sum(weights)
        return tuple(w / total for w in weights)
    # Scaling by a power of two (ldexp, so 2**-e itself never overflows) is exact: the
    # ratios are those of the given weights, and the sum of the scaled ones cannot overflow.
    exponent = math.frexp(max(weights))[1]
    scaled = [math.ldexp(w, -exponent) for w in weights]
    total = math.fsum(scaled)
    return tuple(w / total for w in scaled)


def resolve_options(
    num_levels: int,
    *,
    temperature: PerLevel,
    expert_strength: PerLevel,
    level_weights: Optional[Sequence[float]],
    gate_weight: float,
    expert_weight: float,
    ignore_index: int,
) -> MoEKDOptions:
    temperatures = _per_level("temperature", temperature, num_levels)
    _check_range("temperature", temperatures, low=MIN_TEMPERATURE, low_inclusive=True,
                 high=MAX_TEMPERATURE, expected=_TEMPERATURE_RANGE)
    strengths = _per_level("expert_strength", expert_strength, num_levels)
    _check_range("expert_strength", strengths, low=0.0, low_inclusive=True,
                 high=MAX_EXPERT_STRENGTH, expected=_STRENGTH_RANGE)

    if level_weights is None:
        weights = (1.0 / num_levels,) * num_levels
    else:
        if isinstance(level_weights, torch.Tensor):
            level_weights = level_weights.reshape(-1).tolist()
        if not isinstance(level_weights, (list, tuple)):
            raise TypeError(
                f"level_weights must be None or a sequence of one weight per level "
                f"(L={num_levels}), got {_describe(level_weights)}"
            )
        raw = _per_level("level_weights", level_weights, num_levels)
        _check_range("level_weights", raw, low=0.0, low_inclusive=True,
                     expected="a finite number >= 0")
        if not any(w > 0 for w in raw):
            raise ValueError(f"level_weights must have a positive sum, got {list(raw)}")
        weights = _normalise(raw)

    gate = _as_float("gate_weight", gate_weight)
    _check_range("gate_weight", (gate,), low=0.0, low_inclusive=True, high=MAX_TERM_WEIGHT,
                 expected=_TERM_WEIGHT_RANGE)
    expert = _as_float("expert_weight", expert_weight)
    _check_range("expert_weight", (expert,), low=0.0, low_inclusive=True, high=MAX_TERM_WEIGHT,
                 expected=_TERM_WEIGHT_RANGE)

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"ignore_index must be an int, got {_describe(ignore_index)}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(
            f"ignore_index must be an int in the int64 range [-2**63, 2**63 - 1] (it is compared "
            f"with int64 targets), got {ignore_index}"
        )

    if not _is_symbolic(ignore_index):
        ignore_index = int(ignore_index)
    return MoEKDOptions(temperatures, strengths, weights, gate, expert, ignore_index)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def flatten_inputs(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                   shared_levels: Optional[int] = None):
    """Check shapes and dtypes; return student (N, C), teacher (L, N, C), target (N,) int64.

    The logits come back as views whenever the layout allows one, so backends can use a
    row stride instead of copying. A teacher of the student's shape is one level, or,
    with ``shared_levels`` = L (the length of the per-level option sequences), L levels
    of the same logits: a stride-0 view, never L copies.
    """
    for name, t in (("student_logits", student), ("teacher_logits", teacher), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if student.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"student_logits must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {student.dtype}"
        )
    if teacher.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"teacher_logits must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {teacher.dtype}"
        )
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(
            f"target must be an integer tensor of class indices (int64, int32, int16, int8 or "
            f"uint8), got dtype {target.dtype}"
        )
    if student.dim() < 1:
        raise ValueError("student_logits must have shape (..., C) with at least one dimension, got a scalar")
    if student.device != teacher.device or student.device != target.device:
        raise ValueError(
            "student_logits, teacher_logits and target must be on one device, got "
            f"{student.device}, {teacher.device} and {target.device}"
        )

    lead = tuple(student.shape[:-1])
    num_classes = student.shape[-1]
    if teacher.shape == student.shape:
        shared = teacher
    elif teacher.dim() == student.dim() + 1 and teacher.shape[1:] == student.shape:
        shared = None
    else:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student.shape)} or "
            f"(L, *{tuple(student.shape)}) for L levels, got {tuple(teacher.shape)}"
        )
    if shared is None and teacher.shape[0] < 1:
        raise ValueError("teacher_logits must hold at least one level, got L=0")
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target must have shape {lead} (student_logits without its class dimension), "
            f"got {tuple(target.shape)}"
        )
    if num_classes < 1:
        raise ValueError("student_logits must have at least one class (C >= 1), got C=0")

    student_2d = student.reshape(-1, num_classes)
    if shared is not None:
        # Flatten the one head first: expanding before a reshape that must copy would copy L times.
        num_levels = shared_levels or 1
        teacher_3d = shared.reshape(-1, num_classes).unsqueeze(0).expand(num_levels, -1, -1)
    else:
        teacher_3d = teacher.reshape(teacher.shape[0], -1, num_classes)
    # int64 before anything compares it with ignore_index: in a narrower dtype the
    # comparison would wrap ignore_index (-100 reads as 156 in uint8), while an
    # ignore_index the target dtype cannot hold must match nothing.
    target_1d = target.reshape(-1).to(torch.int64)
    return student_2d, teacher_3d, target_1d


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices must lie in [0, C) unless they equal ``ignore_index``.

    This reads the values, so it runs only where that costs no device sync: on CPU
    tensors, in the op's body (which runs eagerly inside a compiled graph too). On a
    GPU, kernels treat an out-of-range target as NaN for its row instead of reading
    out of bounds.
    """
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target values must be in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"got {value}"
        )


def check_num_items_in_batch(value, reduction: str, device: torch.device):
    """None, or the divisor of the summed loss as a 0-dim tensor on ``device``.

    An int is checked here (> 0); a tensor is never read on the host (no device sync):
    the op checks CPU ones when it runs and simply divides by GPU ones.
    """
    if value is None:
        return None
    if reduction != "mean":
        raise ValueError(
            "num_items_in_batch replaces the row count that reduction='mean' divides the summed "
            f"loss by; it cannot be combined with reduction={reduction!r} (leave reduction='mean')"
        )
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(
                "num_items_in_batch must be an int or a 0-dim integer or floating tensor, got "
                f"{_describe(value)}"
            )
        # A CPU count for GPU logits is moved without waiting for the device; a count is a
        # constant of the loss, never differentiated.
        return value.detach().to(device, non_blocking=True)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"num_items_in_batch must be an int or a 0-dim tensor, got {_describe(value)}")
    if not value > 0:
        raise ValueError(f"num_items_in_batch must be > 0 (the token count of the whole batch), got {value}")
    # A fill on the device: no host-to-device copy, hence no sync.
    return torch.full((), value, dtype=torch.float64, device=device)
