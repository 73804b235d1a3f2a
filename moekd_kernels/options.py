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

# exp(β) has to stay well inside float32 range: D = 1 + expm1(β)·σ and
# u_y ∝ exp(β) are formed directly. At β = 50 the responsibilities are already
# one-hot(y) to float32 precision, so larger values change nothing but overflow.
MAX_EXPERT_STRENGTH = 50.0


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
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got {_describe(value)}")
        value = value.item()
    return float(value)


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


def _check_range(name: str, values: Sequence[float], *, low: float, low_inclusive: bool,
                 high: float = math.inf, expected: str) -> None:
    for i, v in enumerate(values):
        label = name if len(values) == 1 else f"{name}[{i}]"
        ok = math.isfinite(v) and (v >= low if low_inclusive else v > low) and v <= high
        if not ok:
            raise ValueError(f"{label} must be {expected}, got {v!r}")


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
    _check_range("temperature", temperatures, low=0.0, low_inclusive=False,
                 expected="a finite number > 0")
    strengths = _per_level("expert_strength", expert_strength, num_levels)
    _check_range("expert_strength", strengths, low=0.0, low_inclusive=True,
                 high=MAX_EXPERT_STRENGTH, expected=f"a finite number in [0, {MAX_EXPERT_STRENGTH:g}]")

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
        total = math.fsum(raw)
        if total <= 0.0:
            raise ValueError(f"level_weights must have a positive sum, got {list(raw)}")
        weights = tuple(w / total for w in raw)

    gate = _as_float("gate_weight", gate_weight)
    _check_range("gate_weight", (gate,), low=0.0, low_inclusive=True, expected="a finite number >= 0")
    expert = _as_float("expert_weight", expert_weight)
    _check_range("expert_weight", (expert,), low=0.0, low_inclusive=True,
                 expected="a finite number >= 0")

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {_describe(ignore_index)}")

    return MoEKDOptions(temperatures, strengths, weights, gate, expert, int(ignore_index))


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def flatten_inputs(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor):
    """Check shapes and dtypes; return student (N, C), teacher (L, N, C), target (N,).

    The results are views whenever the layout allows one, so backends can use a
    row stride instead of copying.
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
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
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
        teacher_levels = teacher.unsqueeze(0)
    elif teacher.dim() == student.dim() + 1 and teacher.shape[1:] == student.shape:
        teacher_levels = teacher
    else:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student.shape)} or "
            f"(L, *{tuple(student.shape)}) for L levels, got {tuple(teacher.shape)}"
        )
    if teacher_levels.shape[0] < 1:
        raise ValueError("teacher_logits must hold at least one level, got L=0")
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target must have shape {lead} (student_logits without its class dimension), "
            f"got {tuple(target.shape)}"
        )
    if num_classes < 1:
        raise ValueError("student_logits must have at least one class (C >= 1), got C=0")

    num_levels = teacher_levels.shape[0]
    student_2d = student.reshape(-1, num_classes)
    teacher_3d = teacher_levels.reshape(num_levels, -1, num_classes)
    target_1d = target.reshape(-1)
    return student_2d, teacher_3d, target_1d


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices must lie in [0, C) unless they equal ``ignore_index``.

    This reads the values, so it runs only where that costs no device sync
    (CPU tensors, outside torch.compile tracing). On a GPU, kernels treat an
    out-of-range target as NaN for its row instead of reading out of bounds.
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


def per_level_count(teacher_levels: int, *per_level_options) -> int:
    """L: the teacher's own level count, or, for one teacher head, the length of the
    per-level option lists (one head at several temperatures)."""
    if teacher_levels > 1:
        return teacher_levels
    lengths = {len(v) for v in per_level_options if isinstance(v, (list, tuple))}
    return max(lengths) if lengths else 1


def resolve_num_items(num_items_in_batch, reduction: str):
    """The divisor of the summed loss: an int > 0, a 0-dim tensor (never read on the host), or None."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, torch.Tensor)):
        raise TypeError(f"num_items_in_batch must be None, an int or a 0-dim tensor, "
                        f"got {_describe(num_items_in_batch)}")
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.dim() != 0:
        raise ValueError(f"num_items_in_batch must be a 0-dim tensor, got {_describe(num_items_in_batch)}")
    if isinstance(num_items_in_batch, int) and num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    if reduction == "none":
        raise ValueError("num_items_in_batch divides the summed loss; it cannot be used with reduction='none'")
    return num_items_in_batch
