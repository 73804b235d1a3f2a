"""Backend "triton": the fused Triton kernel (moekd_kernels/triton_kernels.py).

CUDA tensors run the compiled kernel. CPU tensors run it under Triton's
interpreter, which Triton enables when ``TRITON_INTERPRET=1`` is set before
it is imported; that is how the tests exercise the kernel without a GPU.

The launch path never synchronises with the device: per-level constants go in
as kernel arguments (tuples of floats, no host-to-device copy). The grid is one
program per row; ``launch_config`` picks the block of classes and the warps.

``phases`` runs the loss over a slice of the classes for the vocab-parallel path
(phases.py's contract), by one more kernel built from the fused kernels' passes.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._jit import check_kernel_inputs
from .options import MoEKDOptions
from .phases import KernelPhases, SliceTeacher
from .teachers import TopKRows

try:
    import triton

    from . import triton_kernels
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
    triton = None
    triton_kernels = None
    _IMPORT_ERROR = exc

STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEACHER_DTYPES = STUDENT_DTYPES + (torch.float64,)

class Tiles(NamedTuple):
    """Launch limits for one device type, in values of a (LP, BLOCK) teacher tile."""

    single: int      # rows with next_pow2(C)·LP up to this stay in registers: one read of s and t
    loop: int        # otherwise BLOCK = loop // LP classes per step of the three passes ...
    loop_block: int  # ... and at most this many


class LaunchConfig(NamedTuple):
    block: int            # classes per step; the single-block path when C <= block
    num_warps: int


# The launch table, in one place (LP = L rounded up to a power of two).
# "cuda": measured on an H100, bf16, N = 16384 (fwd+bwd, benchmarks/RESULTS.md):
# BLOCK 1024 with 4 warps beat 2048–8192 by 5–35% for C ≥ 32768, and neither L2
# eviction hints nor persistent grids (1–8 programs per SM) beat one program per row,
# so the kernel has neither; a row of 4096 values ran 1.16–1.51× faster on 8 warps
# than on 4, one of 8192 (L = 2) best on 16.
# "cpu" is Triton's interpreter: it runs each block op as one numpy call, so its
# cost is per op, not per value, and large tiles keep it fast.
TILES = {"cuda": Tiles(single=8192, loop=4096, loop_block=1024),
         "cpu": Tiles(single=16384, loop=16384, loop_block=16384)}
MIN_BLOCK = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def launch_config(num_classes: int, num_levels: int, device_type: str) -> LaunchConfig:
    """The launch for rows of ``num_classes`` classes and ``num_levels`` levels."""
    levels_padded = _next_pow2(num_levels)
    tiles = TILES.get(device_type, TILES["cuda"])
    block = max(MIN_BLOCK, _next_pow2(num_classes))
    if block * levels_padded > tiles.single:
        block = max(MIN_BLOCK, min(tiles.loop // levels_padded, tiles.loop_block))
    values = block * levels_padded
    num_warps = 4 if values < 4096 else 8 if values == 4096 else 16
    return LaunchConfig(block, num_warps)


def _interpreted() -> bool:
    """Whether the kernel and Triton's own library functions run under the interpreter.

    Triton chooses when a function is decorated: its library (tl.sum, tl.zeros, …)
    when triton is first imported — torch.compile imports it too — and our kernel
    when triton_kernels is. TRITON_INTERPRET=1 set in between leaves a mix that
    fails inside the kernel.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    library_compiled = any(isinstance(getattr(tl, name, None), JITFunction)
                           for name in ("sum", "max", "zeros"))
    return isinstance(triton_kernels.moe_kd_row_kernel, InterpretedFunction) and not library_compiled


def unavailable_reason(device_type: str) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return f"Triton could not be imported ({_IMPORT_ERROR}); install it with `pip install triton`"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available to this PyTorch build"
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                    "before importing triton")
        if not _interpreted():
            return ("TRITON_INTERPRET=1 was set after triton was imported (torch.compile "
                    "imports it too); set it before anything imports triton")
        return None
    return f"the Triton backend runs on cuda (or cpu under TRITON_INTERPRET=1), not {device_type}"


def forward(student: Tensor, teacher, target: Tensor, opts: MoEKDOptions,
            grad_scale: Optional[Tensor] = None,
            need_grad: bool = True) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Registry entry point: (loss, log_likelihood, agreement, grad) per row, one launch.

    ``teacher``: logits (L, N, C), or a top-k teacher (``teachers.TopKRows``), read by its
    own kernel without ever forming an N×C teacher.
    With ``need_grad=False`` the kernel has no gradient pass (a compile-time flag) and no
    N×C buffer is allocated: grad is None, loss and stats are the same bits.
    """
    if isinstance(teacher, TopKRows):
        return _forward_top_k(student, teacher, target, opts, grad_scale, need_grad)
    # Any number of levels: the level count is a compile-time constant of the kernel.
    check_kernel_inputs("triton", student, teacher, TEACHER_DTYPES, device_types=("cuda", "cpu"),
                        max_levels=None)
    num_rows, num_classes = student.shape
    num_levels = teacher.shape[0]
    student, teacher = _unit_class_stride(student), _dense_teacher(teacher)
    target = target.contiguous()

    loss, log_likelihood, agreement, grad = outputs = _outputs(student, need_grad)
    if num_rows == 0:
        return outputs

    block, num_warps = launch_config(num_classes, num_levels, student.device.type)
    triton_kernels.moe_kd_row_kernel[(num_rows,)](
        student, student.stride(0),
        teacher, teacher.stride(0), teacher.stride(1),
        target,
        loss, log_likelihood, agreement,
        # Without a gradient the kernel never touches its pointer: the student stands in.
        grad if need_grad else student, num_classes,
        student if grad_scale is None else grad_scale.to(torch.float32),  # any pointer when unused
        num_classes, opts.ignore_index,
        *_constants(opts),
        L=num_levels,
        LP=_next_pow2(num_levels),
        BLOCK=block,
        SINGLE_BLOCK=num_classes <= block,
        **_switches(opts, grad_scale, need_grad),
        num_warps=num_warps,
    )
    return outputs


def _unit_class_stride(student: Tensor) -> Tensor:
    """Any row stride goes to the kernels; a strided class axis is rare enough (a transposed
    view) to copy rather than to specialise the loads for."""
    return student if student.stride(1) == 1 else student.contiguous()


def _dense_teacher(teacher: Tensor) -> Tensor:
    """Teacher logits (L, N, C) as the kernels read them: any level and row strides, classes
    contiguous. One head at L temperatures (level stride 0) copies the head, not L of it."""
    if teacher.stride(2) == 1:
        return teacher
    if teacher.stride(0) == 0:
        return teacher[:1].contiguous().expand(teacher.shape[0], -1, -1)
    return teacher.contiguous()


def _outputs(student: Tensor, need_grad: bool):
    """Fresh (loss, log_likelihood, agreement) per row, and the gradient buffer or None."""
    num_rows, num_classes = student.shape
    device = student.device
    loss = torch.empty(num_rows, dtype=torch.float32, device=device)
    log_likelihood = torch.empty(num_rows, dtype=torch.float32, device=device)
    agreement = torch.empty(num_rows, dtype=torch.float32, device=device)
    grad = torch.empty((num_rows, num_classes), dtype=student.dtype, device=device) if need_grad else None
    return loss, log_likelihood, agreement, grad


def _switches(opts: MoEKDOptions, grad_scale: Optional[Tensor], need_grad: bool) -> dict:
    """The kernels' compile-time switches: which terms and passes a call needs."""
    return dict(HAS_EXPERT=opts.expert_weight != 0.0, HAS_GATE=opts.gate_weight != 0.0,
                HAS_GRAD_SCALE=grad_scale is not None, NEED_GRAD=bool(need_grad))


def _constants(opts: MoEKDOptions) -> tuple:
    """The kernels' per-level tuples (τ, 1/τ, β, e^β, expm1 β, w), then λ_g and λ_e.
    The constants are rounded to float32 from double, as make_params does in C++."""
    taus = opts.temperatures
    betas = opts.expert_strengths
    return (tuple(float(t) for t in taus),
            tuple(1.0 / t for t in taus),
            tuple(float(b) for b in betas),
            tuple(math.exp(b) for b in betas),
            tuple(math.expm1(b) for b in betas),
            tuple(float(w) for w in opts.level_weights),
            float(opts.gate_weight), float(opts.expert_weight))


class TopKTiles(NamedTuple):
    """Entries per step of the top-k kernel's loops over K, for one device type."""

    shared: int   # every level lists the same classes (L = 1, or one head: level stride 0)
    search: int   # levels list different classes: pass 3 compares (LP·this, this) tiles


# "cuda": not measured yet (no GPU run of the top-k kernel so far); sized so that the
# (LP, block) tiles of passes 1–2 and the (LP·block, block) search tile stay a few
# thousand values. "cpu" (the interpreter): large, as for TILES.
TOPK_TILES = {"cuda": TopKTiles(shared=128, search=32), "cpu": TopKTiles(shared=1024, search=256)}


def _forward_top_k(student: Tensor, teacher: TopKRows, target: Tensor, opts: MoEKDOptions,
                   grad_scale: Optional[Tensor], need_grad: bool):
    """The top-k kernel (triton_kernels.moe_kd_topk_row_kernel): the student dense, the
    teacher as K entries and one logit for the unlisted classes per row and level, all
    read through their strides (a head shared by L levels is never copied)."""
    _check_top_k(student, teacher)
    student = _unit_class_stride(student)
    target = target.contiguous()

    loss, log_likelihood, agreement, grad = outputs = _outputs(student, need_grad)
    num_rows, num_classes = student.shape
    if num_rows == 0:
        return outputs

    indices, values, rest = teacher
    num_levels, _, num_entries = values.shape
    device_type = student.device.type
    block, num_warps = launch_config(num_classes, num_levels, device_type)
    triton_kernels.moe_kd_topk_row_kernel[(num_rows,)](
        student, student.stride(0),
        indices, indices.stride(0), indices.stride(1), indices.stride(2),
        values, values.stride(0), values.stride(1), values.stride(2),
        rest, rest.stride(0), rest.stride(1),
        target,
        loss, log_likelihood, agreement,
        grad if need_grad else student, num_classes,
        student if grad_scale is None else grad_scale.to(torch.float32),
        num_classes, num_entries, opts.ignore_index,
        *_constants(opts),
        L=num_levels,
        LP=_next_pow2(num_levels),
        BLOCK=block,
        SINGLE_BLOCK=num_classes <= block,
        **_top_k_tiles(teacher, device_type),
        **_switches(opts, grad_scale, need_grad),
        num_warps=num_warps,
    )
    return outputs


def _top_k_tiles(teacher: TopKRows, device_type: str) -> dict:
    """The top-k kernels' steps over K. Levels that list the same classes (each level's
    entry k names one class) need no search."""
    num_levels, _, num_entries = teacher.values.shape
    search = num_levels > 1 and teacher.indices.stride(0) != 0
    tiles = TOPK_TILES.get(device_type, TOPK_TILES["cuda"])
    entry_block = min(_next_pow2(num_entries), tiles.search if search else tiles.shared)
    return dict(KB=entry_block, SEARCH=search, QB=entry_block * (_next_pow2(num_levels) if search else 1))


def _check_top_k(student: Tensor, teacher: TopKRows) -> None:
    """What the top-k kernels take: the student's rows and device, and the usual dtypes."""
    indices, values, rest = teacher
    check_kernel_inputs("triton", student, values, TEACHER_DTYPES, device_types=("cuda", "cpu"),
                        max_levels=None)
    num_rows = student.shape[0]
    num_levels = values.shape[0]
    if indices.shape != values.shape or tuple(rest.shape) != (num_levels, num_rows):
        raise ValueError(f"backend 'triton' takes top-k indices shaped like the values {tuple(values.shape)} "
                         f"and rest logits ({num_levels}, {num_rows}), got {tuple(indices.shape)} and "
                         f"{tuple(rest.shape)}")
    if indices.dtype not in (torch.int64, torch.int32) or not rest.dtype.is_floating_point:
        raise TypeError(f"backend 'triton' takes int64 or int32 top-k indices and floating rest logits, "
                        f"got {indices.dtype} and {rest.dtype}")
    if indices.device != student.device or rest.device != student.device:
        raise ValueError(f"backend 'triton' takes the top-k teacher on the student's device "
                         f"{student.device}, got {indices.device} and {rest.device}")


# ---- the phases over a class slice (phases.py's contract, for the vocab-parallel path) ----

class _TritonPhases(KernelPhases):
    """The phase functions of ``phases.py`` (same signatures, same results up to float32
    rounding), run by ``triton_kernels.moe_kd_phase_kernel``: one program per row, the
    fused kernels' passes over the slice's classes, the top-k teacher read as its K
    entries per row (never N×C_r). No launch reads a value back to the host."""

    @staticmethod
    def check_inputs(student: Tensor, teacher: Tensor) -> None:
        """The dtypes and devices the kernel takes; ``teacher`` the dense logits or the top-k values."""
        check_kernel_inputs("triton", student, teacher if teacher.dim() == 3 else teacher[None],
                            TEACHER_DTYPES, device_types=("cuda", "cpu"), max_levels=None)

    def dense_teacher(self, logits: Tensor, opts: MoEKDOptions, acc: torch.dtype) -> SliceTeacher:
        return SliceTeacher(_dense_teacher(logits), None, 0, opts)

    @staticmethod
    def run(phase: int, student: Tensor, teacher: SliceTeacher, target: Optional[Tensor],
            row_in: Optional[Tensor], grad_scale=None) -> Tensor:
        """One launch of phase 0–3: its (rows, N) float32 table, or the (N, C_r) gradient."""
        opts = teacher.opts
        if teacher.rows is not None:
            _check_top_k(student, teacher.rows)
        student = _unit_class_stride(student)
        num_rows, num_classes = student.shape
        num_levels = opts.num_levels
        device = student.device
        if phase == 3:
            out = torch.empty((num_rows, num_classes), dtype=student.dtype, device=device)
        else:
            table_rows = (1 + num_levels, 1 + 2 * num_levels, 3 + 3 * num_levels)[phase]  # phases.py's layouts
            out = torch.empty((table_rows, num_rows), dtype=torch.float32, device=device)
        if num_rows == 0:
            return out
        target = student if target is None else target.contiguous()  # phases 0 and 1 do not read it
        row_in = out if row_in is None else row_in.to(device=device, dtype=torch.float32).contiguous()
        if grad_scale is not None:
            grad_scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device)
        block, num_warps = launch_config(num_classes, num_levels, device.type)
        # The student stands in for the other teacher kind's pointers, which are never read.
        if teacher.rows is not None:
            indices, values, rest = teacher.rows
            dense_args = (student, 0, 0)
            top_k_args = (indices, *indices.stride(), values, *values.stride(), rest, *rest.stride())
            top_k = _top_k_tiles(teacher.rows, device.type)
            num_entries = values.shape[2]
        else:
            dense_args = (teacher.dense, teacher.dense.stride(0), teacher.dense.stride(1))
            top_k_args = (student, 0, 0, 0, student, 0, 0, 0, student, 0, 0)
            top_k = dict(KB=1, SEARCH=False, QB=1)
            num_entries = 0
        triton_kernels.moe_kd_phase_kernel[(num_rows,)](
            student, student.stride(0),
            *dense_args,
            *top_k_args,
            target,
            row_in, out,
            out if phase == 3 else student, num_classes,
            student if grad_scale is None else grad_scale,
            num_rows, num_classes, teacher.class_offset, num_entries, opts.ignore_index,
            *_constants(opts),
            PHASE=phase,
            TOP_K=teacher.rows is not None,
            L=num_levels,
            LP=_next_pow2(num_levels),
            BLOCK=block,
            **top_k,
            # Phases 1 and 2 give every row of their tables; the gradient only needs the terms used.
            HAS_EXPERT=phase < 3 or opts.expert_weight != 0.0,
            HAS_GATE=phase < 3 or opts.gate_weight != 0.0,
            HAS_GRAD_SCALE=grad_scale is not None,
            num_warps=num_warps,
        )
        return out


phases = _TritonPhases()


# The scaling pass: BLOCK classes per step (16 bf16 values per thread at 4 warps, two
# 16-byte accesses); rows are split into spans only until there are about this many
# programs, so that skipping rows whose factor is 1 costs few programs.
SCALE_BLOCK = 2048
SCALE_TARGET_PROGRAMS = 8192
MAX_GRID_Y = 65535


def scale_rows_(grad: Tensor, scale: Tensor) -> Tensor:
    """grad[i, :] *= scale[i] in place; scale (N,), stride 0 allowed (one value for all rows).
    A row whose factor is 1 is not touched: its programs return after reading the factor.

    Backward's pass over the saved gradient on the GPU: one read and one write of it
    with wide accesses, the factor kept in float32 whatever the gradient's dtype.
    benchmarks/gpu_check.py times it against PyTorch's ``mul_`` (2.7× faster on an
    H100 for a bf16 gradient, where ``mul_`` by a float32 0-dim tensor ran at 1 TB/s).
    """
    num_rows, num_classes = grad.shape
    if num_rows == 0 or num_classes == 0:
        return grad
    if grad.stride(1) != 1:
        raise ValueError("scale_rows_ needs a gradient with contiguous rows")
    scale = scale.to(torch.float32)
    blocks = triton.cdiv(num_classes, SCALE_BLOCK)
    spans = max(1, min(blocks, triton.cdiv(SCALE_TARGET_PROGRAMS, num_rows), MAX_GRID_Y))
    span = triton.cdiv(blocks, spans) * SCALE_BLOCK
    grid = (num_rows, triton.cdiv(num_classes, span))
    triton_kernels.scale_rows_kernel[grid](grad, grad.stride(0), scale, scale.stride(0), num_classes, span,
                                           BLOCK=SCALE_BLOCK, num_warps=4)
    return grad
