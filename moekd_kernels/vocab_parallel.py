"""MoE-KD with the classes sharded over a ``torch.distributed`` process group.

Rank r holds the logits of the contiguous class slice [o_r, o_r + C_r), the
slices in rank order; the target holds global class indices and is the same on
every rank. The three phases of ``phases.py`` run on each slice, computed by the
resolved backend's phase functions (``backends.Backend.phases``: the PyTorch ones
for "reference", the C++ kernel's for "cpu", the Triton kernel's for "triton"; "auto"
takes the first of AUTO_ORDER that has them), and between them the per-row partial results cross the group as
all-reduces:

    agreement   all_gather of 13 int64 per rank        slice sizes, shapes, target and option checks
    phase 1     all_reduce MAX of (1 + L) per row     max s, max t_ℓ/τ_ℓ
                all_reduce SUM of (1 + 2L) per row    sums of exponentials
    phase 2     all_reduce SUM of (3 + 3L) per row    E-step sums

so (5 + 6L) values per row cross the network (20 + 24L bytes in float32), against
(L + 1)·C values per row to all-gather the logits. Every rank then forms the same
loss and stats from the same sums, and the gradient of its own slice.
``fused_linear_moe_kd_loss(..., process_group=)`` runs the same three all-reduces per
chunk of rows, and one more that sums the hidden states' gradient (N·H values).

The first collective is also the guard against hangs: every rank first checks its
own inputs, and a rank whose inputs are bad still joins it with a flag, so that
every rank raises instead of some waiting in a later collective.

Under torch.compile the agreement and the phases run inside one registered op
(``moekd_kernels::vocab_parallel_moe_kd_loss``, the group passed by name), so a
compiled step keeps the call in its graph; a rank whose own checks fail while it is
traced joins the agreement from the tracer (``reject_on_every_rank``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, NamedTuple, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
# A registered op cannot take a ProcessGroup: it takes the group's name, and this turns
# the name back into the group, as torch's own functional collectives do.
from torch.distributed.distributed_c10d import _resolve_process_group

from . import phases
from .backends import BACKENDS, resolve_sharded_backend
from .ops import fake_outputs, loss_divisor, reduced_outputs, register_first_order_autograd
from .options import (MoEKDOptions, check_num_items_in_batch, check_reduction, option_levels,
                      resolve_options)
from .reference import accumulation_dtype
from .teachers import TopKTeacher, flatten_teacher_inputs, topk_rows


@dataclass
class CollectiveCounts:
    """What one call sent: the tests assert how many collectives run and what they carry."""

    calls: int = 0
    bytes_reduced: int = 0   # by the all-reduces


# The counts of the last call in this process. Only the counts: a module-level reference
# to the group would keep it alive past destroy_process_group, and its gloo threads would
# then be torn down at interpreter exit, which aborts the process.
last_counts = CollectiveCounts()


class Communicator:
    """The group's collectives, counted in ``counts`` (also ``last_counts``)."""

    def __init__(self, group) -> None:
        global last_counts
        self.group = group
        self.counts = last_counts = CollectiveCounts()

    def all_reduce(self, tensor: Tensor, op) -> Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        self.counts.calls += 1
        self.counts.bytes_reduced += tensor.element_size() * tensor.numel()
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, dist.ReduceOp.MAX)

    def sum_(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, dist.ReduceOp.SUM)

    def all_gather(self, tensor: Tensor) -> Tensor:
        world = dist.get_world_size(self.group)
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor, group=self.group)
        self.counts.calls += 1
        return torch.stack(out)


def check_process_group(process_group) -> None:
    if isinstance(process_group, bool) or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(process_group).__name__}")


# --------------------------------------------------------------------------- agreement


_AGREEMENT_FIELDS = 13


class Agreement(NamedTuple):
    class_offset: int   # this rank's first class
    num_classes: int    # the classes of all ranks' slices
    chunk_rows: int     # the fewest rows per chunk any rank asked for (fused linear)


def _fingerprint(*parts) -> int:
    """A 62-bit hash of what every rank must agree on (the options), as an int64 value."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 2


def _target_checksum(target: Tensor) -> int:
    if target.numel() == 0:
        return 0
    weights = torch.arange(1, target.numel() + 1, dtype=torch.int64, device=target.device)
    return int(((target.long() * weights) % 1_000_000_007).sum())


def _range_fields(indices: Optional[Tensor]):
    """min, max and count of class indices, for a range check against the global C."""
    if indices is None or indices.numel() == 0:
        return [0, -1, 0]
    indices = indices.long()
    return [int(indices.min()), int(indices.max()), indices.numel()]


def agree_on_inputs(comm: Communicator, local_error: Optional[BaseException], *, num_classes: int = 0,
                    num_rows: int = 0, num_levels: int = 0, target: Optional[Tensor] = None,
                    ignore_index: int = 0, teacher_indices: Optional[Tensor] = None,
                    settings=None, chunk_rows: int = 0) -> Agreement:
    """One all_gather; every rank raises if any rank's inputs are bad.

    ``teacher_indices``: the listed classes of a top-k teacher (global indices), checked
    against the total class count as the target is. ``settings``: what every rank must
    pass alike (options, reduction, teacher kind, ...).
    """
    fields = torch.zeros(_AGREEMENT_FIELDS, dtype=torch.int64)
    if local_error is None:
        fields[:] = torch.tensor(
            [0, num_classes, num_rows, num_levels, _target_checksum(target), _fingerprint(settings)]
            + _range_fields(target[target != ignore_index])
            + _range_fields(teacher_indices) + [chunk_rows])
    else:
        fields[0] = 1
    device = torch.device("cpu")
    if dist.get_backend(comm.group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    gathered = comm.all_gather(fields.to(device)).cpu()
    rank = dist.get_rank(comm.group)
    bad = gathered[:, 0].nonzero().flatten().tolist()
    if bad:
        if local_error is not None:
            try:
                raise local_error
            finally:
                del local_error  # see reject_on_every_rank
        raise ValueError(f"process_group: rank(s) {bad} rejected their inputs (see the error raised "
                         "there); every rank stops before the loss runs")
    widths = gathered[:, 1]
    total = int(widths.sum())
    for first, what, allowed in ((6, "target values", f" or equal ignore_index={ignore_index}"),
                                 (9, "TopKTeacher indices", "")):
        present = gathered[:, first + 2] > 0
        if bool(present.any()):
            low, high = int(gathered[present, first].min()), int(gathered[present, first + 1].max())
            if low < 0 or high >= total:
                raise ValueError(f"{what} must be in [0, {total}) (the classes of all ranks' slices)"
                                 f"{allowed}, got {low if low < 0 else high}")
    for column, what in ((2, "rows (the target's size)"), (3, "teacher levels"), (4, "target values"),
                         (5, "options (temperature, expert_strength, level_weights, weights, "
                             "ignore_index, reduction, teacher kind, hidden size, which inputs "
                             "need gradients)")):
        differs = (gathered[:, column] != gathered[0, column]).nonzero().flatten()
        if differs.numel():
            raise ValueError(f"process_group: every rank must pass the same {what}; rank 0 and "
                             f"rank {int(differs[0])} differ")
    return Agreement(int(widths[:rank].sum()), total, int(gathered[:, 12].min()))


_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError}


@torch.compiler.assume_constant_result
def _reject_while_tracing(group_name: str, error_type: str, message: str) -> bool:
    # torch.compile runs a function marked so while it traces (it takes its result as a
    # constant), so the rank that found the error joins the agreement then, as the
    # other ranks do when their compiled op runs.
    agree_on_inputs(Communicator(_resolve_process_group(group_name)), _ERROR_TYPES[error_type](message))
    return False


def reject_on_every_rank(process_group, error: Exception) -> NoReturn:
    """Raise ``error`` here and make every other rank raise too, at its agreement."""
    try:
        if torch.compiler.is_compiling():
            _reject_while_tracing(process_group.group_name, type(error).__name__, str(error))
        agree_on_inputs(Communicator(process_group), error)  # raises it
    finally:
        # A frame that holds the exception it raises is in a reference cycle with it
        # (exception → traceback → frame → exception) that only the cyclic GC frees. These
        # frames hold the group: kept alive, it keeps its gloo threads past
        # destroy_process_group, and they abort the process at exit.
        del error


def checked_on_every_rank(process_group, check, *args, **kwargs):
    """``check(*args, **kwargs)``; a ValueError or TypeError it raises is raised on every rank."""
    check_process_group(process_group)
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        reject_on_every_rank(process_group, exc)


# --------------------------------------------------------------------------- the rows of a slice


class SliceRows:
    """The backend contract's per-row results for rows whose classes this rank holds a
    slice of: the phases of ``impl`` with all-reduces over ``comm`` between them. Called
    like ``backends.Backend.forward`` with dense teacher logits; ``fused_linear`` calls it
    per chunk of rows."""

    def __init__(self, comm: Communicator, impl, opts: MoEKDOptions, agreed: Agreement) -> None:
        self.comm, self.impl, self.opts, self.agreed = comm, impl, opts, agreed

    def __call__(self, student: Tensor, teacher, target: Tensor, grad_scale: Optional[Tensor],
                 need_grad: bool):
        """``teacher``: logits (L, N, C_r), or a loader built by ``impl``."""
        if isinstance(teacher, Tensor):
            teacher = self.impl.dense_teacher(teacher, self.opts, accumulation_dtype(student.dtype))
        return phases.slice_rows(student, teacher, target, self.opts, num_classes=self.agreed.num_classes,
                                 grad_scale=grad_scale, need_grad=need_grad, combine=self.comm,
                                 class_offset=self.agreed.class_offset, impl=self.impl)

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """In place; a low-precision tensor is summed in float32 and rounded once."""
        if tensor.dtype in (torch.float32, torch.float64):
            return self.comm.sum_(tensor)
        return tensor.copy_(self.comm.sum_(tensor.float()))


def agreed_slice_rows(group_name: str, backend: str, opts: MoEKDOptions, *, target: Tensor, settings,
                      width: int, student: Optional[Tensor] = None, teacher: Optional[Tensor] = None,
                      teacher_indices: Optional[Tensor] = None, chunk_rows: int = 0) -> SliceRows:
    """The ``SliceRows`` of this rank once every rank has agreed on the inputs (one
    all_gather): ``width`` classes here, ``settings`` alike everywhere. ``student`` and
    ``teacher`` (logits or top-k values), when given, go through the backend's own input
    checks first, whose errors every rank raises."""
    comm = Communicator(_resolve_process_group(group_name))
    impl = BACKENDS[backend].load_phases()
    if student is not None:
        try:
            impl.check_inputs(student, teacher)
        except (ValueError, TypeError) as exc:
            agree_on_inputs(comm, exc)
    agreed = agree_on_inputs(comm, None, num_classes=width, num_rows=target.numel(),
                             num_levels=opts.num_levels, target=target, ignore_index=opts.ignore_index,
                             teacher_indices=teacher_indices, settings=settings, chunk_rows=chunk_rows)
    return SliceRows(comm, impl, opts, agreed)


# --------------------------------------------------------------------------- the registered op


def count_setting(num_items_in_batch: Optional[Tensor]):
    """What ranks must agree on about ``num_items_in_batch``: a CPU count's value (read
    without a device sync), else whether one is given."""
    if num_items_in_batch is None or num_items_in_batch.device.type != "cpu":
        return num_items_in_batch is not None
    return float(num_items_in_batch)


@torch.library.custom_op("moekd_kernels::vocab_parallel_moe_kd_loss", mutates_args=())
def vocab_parallel_op(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperatures: List[float],
    expert_strengths: List[float],
    level_weights: List[float],
    gate_weight: float,
    expert_weight: float,
    ignore_index: int,
    backend: str,
    reduction: str,
    need_grad: bool,
    num_items_in_batch: Optional[Tensor],
    teacher_indices: Optional[Tensor],
    teacher_kind: str,
    group_name: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ops.moe_kd_loss`` for a class slice: student (N, C_r), teacher logits (L, N, C_r) or,
    with ``teacher_indices``, a top-k teacher's values (L_t, N, K) of kind ``teacher_kind``
    at global indices; ``group_name`` names the process group. Agrees on the inputs, then
    runs the phases of ``backend`` with all-reduces between them."""
    opts = MoEKDOptions(tuple(temperatures), tuple(expert_strengths), tuple(level_weights),
                        gate_weight, expert_weight, ignore_index)
    num_rows, width = student.shape
    top_k = teacher_indices is not None
    rows_of = agreed_slice_rows(
        group_name, backend, opts, target=target, width=width, student=student, teacher=teacher,
        teacher_indices=teacher_indices[~torch.isneginf(teacher)] if top_k else None,
        settings=(opts, reduction, teacher_kind, count_setting(num_items_in_batch)))
    acc = accumulation_dtype(student.dtype)
    if top_k:
        rows = topk_rows(TopKTeacher(teacher_indices, teacher, teacher_kind), teacher.shape[0],
                         opts.num_levels, num_rows, rows_of.agreed.num_classes)
        teacher = rows_of.impl.top_k_teacher(rows, rows_of.agreed.class_offset, width, opts, acc)
    divisor = loss_divisor(target, ignore_index, reduction, num_items_in_batch)
    grad_scale = None if divisor is None else 1.0 / divisor.to(acc)
    loss, log_likelihood, agreement, grad = rows_of(student, teacher, target, grad_scale, need_grad)
    return reduced_outputs(student, loss, log_likelihood, agreement, grad, reduction, divisor, need_grad)


@vocab_parallel_op.register_fake
def _vocab_parallel_fake(student, teacher, target, temperatures, expert_strengths, level_weights,
                         gate_weight, expert_weight, ignore_index, backend, reduction, need_grad,
                         num_items_in_batch, teacher_indices, teacher_kind, group_name):
    return fake_outputs(student, reduction, need_grad)


register_first_order_autograd(vocab_parallel_op, num_inputs=16)


def _prepare(student_logits: Tensor, teacher, target: Tensor, *, temperature, expert_strength,
             level_weights, gate_weight, expert_weight, ignore_index, reduction, num_items_in_batch,
             backend, return_stats):
    """``sharded_moe_kd_loss``'s checks of its own rank's arguments."""
    # A top-k teacher's indices are global: their range is checked once C is agreed on.
    inputs = flatten_teacher_inputs(student_logits, teacher, target,
                                    option_levels(temperature, expert_strength, level_weights),
                                    global_indices=True)
    opts = resolve_options(inputs.num_levels, temperature=temperature, expert_strength=expert_strength,
                           level_weights=level_weights, gate_weight=gate_weight,
                           expert_weight=expert_weight, ignore_index=ignore_index)
    check_reduction(reduction)
    resolved = resolve_sharded_backend(backend, inputs.student.device, inputs.student.dtype,
                                       inputs.num_levels, isinstance(teacher, TopKTeacher))
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    num_items = check_num_items_in_batch(num_items_in_batch, reduction, inputs.student.device)
    return inputs, opts, resolved, num_items


def sharded_moe_kd_loss(student_logits: Tensor, teacher, target: Tensor, *, process_group,
                        temperature, expert_strength, level_weights, gate_weight, expert_weight,
                        ignore_index, reduction, num_items_in_batch, backend, return_stats):
    """``fused_moe_kd_loss(..., process_group=group)``: the same checks on every rank, then
    the op, whose first collective agrees on them."""
    from .loss import MoEKDStats

    inputs, opts, resolved, num_items = checked_on_every_rank(
        process_group, _prepare, student_logits, teacher, target, temperature=temperature,
        expert_strength=expert_strength, level_weights=level_weights, gate_weight=gate_weight,
        expert_weight=expert_weight, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, backend=backend, return_stats=return_stats)
    student_2d = inputs.student
    if isinstance(teacher, TopKTeacher):
        shape = (inputs.teacher_levels, student_2d.shape[0], teacher.k)
        values, indices, kind = teacher.values.detach().reshape(shape), teacher.indices.reshape(shape), teacher.kind
    else:
        values, indices, kind = inputs.teacher.detach(), None, "dense"
    loss, log_likelihood, agreement, _ = vocab_parallel_op(
        student_2d, values, inputs.target, list(opts.temperatures), list(opts.expert_strengths),
        list(opts.level_weights), opts.gate_weight, opts.expert_weight, opts.ignore_index, resolved,
        reduction, torch.is_grad_enabled() and student_logits.requires_grad, num_items, indices, kind,
        process_group.group_name)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, MoEKDStats(log_likelihood.reshape(target.shape), agreement.reshape(target.shape))
