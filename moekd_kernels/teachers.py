"""Teachers other than dense logits: ``TopKTeacher``, a teacher stored as its top-k.

Offline distillation at LLM scale runs the teacher once and keeps a few dozen of
its logits or log-probabilities per token. ``TopKTeacher`` carries those, and the
loss reads them without ever building the N×C teacher (docs/math.md, "Extensions").
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

KINDS = ("logits", "logprobs")
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


class TopKTeacher:
    """A teacher given by K classes per row: ``indices`` and ``values``, shaped
    ``(..., K)`` for one level or ``(L, ..., K)`` for L levels.

    kind="logits": the gate at level ℓ is softmax(values / τ_ℓ) over the listed classes
        and 0 elsewhere: the teacher truncated to its top K, renormalised.
    kind="logprobs": values are log-probabilities of the teacher's full distribution at
        temperature 1; the mass they leave, ρ = 1 − Σ exp(values) (at least 0), is spread
        evenly over the unlisted classes, and the gate at τ is ∝ p^(1/τ) over all classes.

    A value of −inf is padding: that entry is ignored and its class counts as unlisted.
    The listed indices of a row must be distinct and in [0, C); this is checked for CPU
    tensors and not on GPUs (where it would cost a device sync): there a repeated or
    out-of-range index gives a wrong loss.
    """

    def __init__(self, indices: Tensor, values: Tensor, kind: str = "logits") -> None:
        if not isinstance(indices, Tensor) or indices.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"TopKTeacher indices must be an integer tensor of class indices, "
                            f"got {_describe(indices)}")
        if not isinstance(values, Tensor) or not values.dtype.is_floating_point:
            raise TypeError(f"TopKTeacher values must be a floating tensor, got {_describe(values)}")
        if indices.shape != values.shape:
            raise ValueError(f"TopKTeacher indices and values must have one shape, got "
                             f"{tuple(indices.shape)} and {tuple(values.shape)}")
        if indices.dim() < 1 or indices.shape[-1] < 1:
            raise ValueError(f"TopKTeacher indices must have shape (..., K) with K >= 1, "
                             f"got {tuple(indices.shape)}")
        if indices.device != values.device:
            raise ValueError(f"TopKTeacher indices and values must be on one device, got "
                             f"{indices.device} and {values.device}")
        if kind not in KINDS:
            raise ValueError(f"TopKTeacher kind must be one of {KINDS}, got {kind!r}")
        self.indices = indices
        self.values = values
        self.kind = kind

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def __repr__(self) -> str:
        return (f"TopKTeacher(kind={self.kind!r}, shape={tuple(self.indices.shape)}, "
                f"values={self.values.dtype}, device={self.values.device})")

    def to_dense(self, num_classes: int) -> Tensor:
        """The dense teacher logits this teacher stands for (float32 or float64): what the
        loss would give for them equals what it gives for this teacher. Costs N×C memory:
        for checks and comparisons, not for training."""
        acc = torch.float64 if self.values.dtype == torch.float64 else torch.float32
        values = self.values.to(acc)
        listed = ~torch.isneginf(values)
        if self.kind == "logits":
            rest = torch.full(values.shape[:-1], -torch.inf, dtype=acc, device=values.device)
        else:
            rest = rest_logit(values, listed, num_classes).to(acc)
        dense = rest[..., None].expand(*values.shape[:-1], num_classes).clone()
        # Padding entries write nothing: send them to a spare column, then drop it.
        spare = torch.full_like(self.indices, num_classes, dtype=torch.long)
        index = torch.where(listed, self.indices.long(), spare)
        dense = torch.cat([dense, dense[..., :1]], dim=-1).scatter(-1, index, values)
        return dense[..., :num_classes]


def check_topk_teacher(teacher: TopKTeacher, lead_shape: Tuple[int, ...], num_classes: Optional[int],
                       device: torch.device) -> int:
    """Shapes against the student's; on CPU also the listed indices' distinctness and, unless
    ``num_classes`` is None (classes sharded: the caller checks), their range and count.
    Returns the teacher's own level count (1 for a ``(..., K)`` teacher)."""
    shape = tuple(teacher.indices.shape)
    if shape[:-1] == lead_shape:
        num_levels = 1
    elif len(shape) == len(lead_shape) + 2 and shape[1:-1] == lead_shape:
        num_levels = shape[0]
    else:
        raise ValueError(f"TopKTeacher indices must have shape {lead_shape + ('K',)} or "
                         f"(L, *{lead_shape}, K) to match student_logits, got {shape}")
    if num_levels < 1:
        raise ValueError("TopKTeacher must hold at least one level, got L=0")
    if teacher.indices.device != device:
        raise ValueError(f"TopKTeacher and student_logits must be on one device, got "
                         f"{teacher.indices.device} and {device}")
    if num_classes is not None and teacher.k > num_classes:
        raise ValueError(f"TopKTeacher lists K={teacher.k} classes per row, more than the student's "
                         f"C={num_classes}")
    if device.type == "cpu" and teacher.indices.numel() and not torch.compiler.is_compiling():
        listed = ~torch.isneginf(teacher.values)
        index = teacher.indices.long()
        if num_classes is not None:
            bad = listed & ((index < 0) | (index >= num_classes))
            if bool(bad.any()):
                raise ValueError(f"TopKTeacher indices must be in [0, {num_classes}), got {int(index[bad][0])}")
        # Padding entries get distinct negative stand-ins, so only listed classes can repeat.
        stand_in = -1 - torch.arange(teacher.k).expand_as(index)
        ordered = torch.where(listed, index, stand_in).sort(dim=-1).values
        repeated = ordered[..., 1:] == ordered[..., :-1]
        if bool(repeated.any()):
            raise ValueError("TopKTeacher indices must be distinct within a row, got class "
                             f"{int(ordered[..., 1:][repeated][0])} twice")
    return num_levels


class TopKRows(NamedTuple):
    """A top-k teacher as the backends take it: the rows flattened, one entry per level.

    indices, values: (L, N, K); rest: (L, N), the logit of every unlisted class (−inf for
    kind "logits", log(ρ / (C − K′)) for kind "logprobs"), so that a backend reads the same
    thing for both kinds: the dense teacher row is ``rest`` with ``values`` at ``indices``
    (−inf values are padding: their entries are skipped).
    """

    indices: Tensor
    values: Tensor
    rest: Tensor


def rest_logit(values: Tensor, listed: Tensor, num_classes: int) -> Tensor:
    """log(ρ / (C − K′)) per row of top-k log-probabilities, −inf when no mass or no class is
    left. In float64 whatever the values' dtype: at temperature τ the unlisted classes
    weigh ρ^(1/τ), so a float32 rounding of ρ ≈ 0 (6e-8 for 1e-16) would grow by orders
    of magnitude."""
    values = values.double()
    mass_left = (1.0 - torch.where(listed, values.exp(), 0.0).sum(-1)).clamp_min(0.0)
    num_unlisted = num_classes - listed.sum(-1)
    return torch.where(num_unlisted > 0, (mass_left / num_unlisted.clamp_min(1)).log(), -math.inf)


def topk_rows(teacher: TopKTeacher, teacher_levels: int, num_levels: int, num_rows: int,
              num_classes: int) -> TopKRows:
    """The backends' form of ``teacher`` (checked by ``check_topk_teacher``): a ``(..., K)``
    teacher used at ``num_levels`` levels is expanded, not copied."""
    indices, values = teacher.indices, teacher.values.detach()
    if teacher_levels == 1:
        indices, values = indices.unsqueeze(0), values.unsqueeze(0)
    indices = indices.reshape(indices.shape[0], num_rows, teacher.k).long()
    values = values.reshape(values.shape[0], num_rows, teacher.k)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    if teacher.kind == "logits":
        rest = torch.full(values.shape[:2], -math.inf, dtype=acc, device=values.device)
    else:
        rest = rest_logit(values, ~torch.isneginf(values), num_classes).to(acc)
    expand = (num_levels, num_rows, teacher.k)
    return TopKRows(indices.expand(expand), values.expand(expand), rest.expand(expand[:2]))


class FlatInputs(NamedTuple):
    student: Tensor                     # (N, C)
    teacher: Union[Tensor, TopKTeacher]  # (L, N, C) logits (views, stride 0 for a shared head), or top-k
    target: Tensor                      # (N,) int64
    num_levels: int                     # L
    teacher_levels: int                 # the teacher's own level count (1 for a shared head)


def flatten_teacher_inputs(student: Tensor, teacher, target: Tensor, shared_levels: Optional[int],
                           *, global_indices: bool = False) -> FlatInputs:
    """``options.flatten_inputs`` for dense and top-k teachers alike. A one-level teacher is
    used at ``shared_levels`` levels (the per-level options' length) when that is given.
    ``global_indices``: the student holds a slice of the classes, so a top-k teacher's indices
    are checked against the global class count later, not here."""
    from .options import flatten_inputs

    if isinstance(teacher, TopKTeacher):
        if not isinstance(student, Tensor):
            raise TypeError(f"student_logits must be a torch.Tensor, got {_describe(student)}")
        # The student stands in for the teacher: this checks the student and the target.
        student_2d, _, target_1d = flatten_inputs(student, student, target)
        teacher_levels = check_topk_teacher(teacher, tuple(student.shape[:-1]),
                                            None if global_indices else student.shape[-1],
                                            student_2d.device)
        num_levels = teacher_levels if teacher_levels > 1 else (shared_levels or 1)
        return FlatInputs(student_2d, teacher, target_1d, num_levels, teacher_levels)
    if not (isinstance(student, Tensor) and isinstance(teacher, Tensor) and teacher.shape == student.shape):
        shared_levels = None  # an (L, ..., C) teacher has its own levels
    student_2d, teacher_3d, target_1d = flatten_inputs(student, teacher, target, shared_levels)
    own_levels = 1 if shared_levels else teacher_3d.shape[0]
    return FlatInputs(student_2d, teacher_3d, target_1d, teacher_3d.shape[0], own_levels)
