"""MoE-KD with the classes sharded over a ``torch.distributed`` process group.

Rank r holds the logits of the contiguous class slice [o_r, o_r + C_r), the
slices in rank order; the target holds global class indices and is the same on
every rank. The three phases of ``phases.py`` run on each slice, computed by the
resolved backend's phase functions (``backends.Backend.phases``: the PyTorch ones
for "reference", the C++ kernel's for "cpu"; "auto" takes the first of AUTO_ORDER
that has them), and between them the per-row partial results cross the group as
all-reduces:

    agreement   all_gather of 12 int64 per rank        slice sizes, shapes, target and option checks
    phase 1     all_reduce MAX of (1 + L) per row     max s, max t_ℓ/τ_ℓ
                all_reduce SUM of (1 + 2L) per row    sums of exponentials
    phase 2     all_reduce SUM of (3 + 3L) per row    E-step sums

so (5 + 6L) values per row cross the network (20 + 24L bytes in float32), against
(L + 1)·C values per row to all-gather the logits. Every rank then forms the same
loss and stats from the same sums, and the gradient of its own slice.

The first collective is also the guard against hangs: every rank first checks its
own inputs, and a rank whose inputs are bad still joins it with a flag, so that
every rank raises instead of some waiting in a later collective.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import phases
from .backends import BACKENDS, resolve_sharded_backend
from .options import (check_num_items_in_batch, check_reduction, option_levels,
                      resolve_options)
from .reference import accumulation_dtype
from .teachers import TopKTeacher, flatten_teacher_inputs, topk_rows


_AGREEMENT_FIELDS = 12


class Communicator:
    """The group's collectives, counted: the tests assert how many run and what they carry."""

    def __init__(self, group) -> None:
        global last_communicator
        self.group = group
        self.calls = 0
        self.bytes_per_row = 0
        last_communicator = self

    def all_reduce(self, tensor: Tensor, op) -> Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        self.calls += 1
        self.bytes_per_row += tensor.element_size() * (tensor.numel() // max(tensor.shape[-1], 1))
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, dist.ReduceOp.MAX)

    def sum_(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, dist.ReduceOp.SUM)

    def all_gather(self, tensor: Tensor) -> Tensor:
        world = dist.get_world_size(self.group)
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor, group=self.group)
        self.calls += 1
        return torch.stack(out)


# The last Communicator used in this process, for tests that count collectives.
last_communicator: Optional[Communicator] = None


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
                    settings=None) -> Tuple[int, int]:
    """One all_gather; every rank raises if any rank's inputs are bad. Returns
    (this rank's class offset, the total class count).

    ``teacher_indices``: the listed classes of a top-k teacher (global indices), checked
    against the total class count as the target is.
    """
    fields = torch.zeros(_AGREEMENT_FIELDS, dtype=torch.int64)
    if local_error is None:
        fields[:] = torch.tensor(
            [0, num_classes, num_rows, num_levels, _target_checksum(target), _fingerprint(settings)]
            + _range_fields(target[target != ignore_index])
            + _range_fields(teacher_indices))
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
            raise local_error
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
                             "ignore_index, reduction, teacher kind)")):
        differs = (gathered[:, column] != gathered[0, column]).nonzero().flatten()
        if differs.numel():
            raise ValueError(f"process_group: every rank must pass the same {what}; rank 0 and "
                             f"rank {int(differs[0])} differ")
    return int(widths[:rank].sum()), total


def sharded_moe_kd_loss(student_logits: Tensor, teacher, target: Tensor, *, process_group,
                        temperature, expert_strength, level_weights, gate_weight, expert_weight,
                        ignore_index, reduction, num_items_in_batch, backend, return_stats):
    """``fused_moe_kd_loss(..., process_group=group)``: the same checks on every rank, one
    collective that agrees on them, then the phases with all-reduces between them."""
    from .loss import MoEKDStats

    comm = Communicator(process_group)
    local_error: Optional[BaseException] = None
    try:
        # A top-k teacher's indices are global: their range is checked once C is agreed on.
        inputs = flatten_teacher_inputs(student_logits, teacher, target,
                                        option_levels(temperature, expert_strength, level_weights),
                                        global_indices=True)
        student_2d, target_1d, num_levels = inputs.student, inputs.target, inputs.num_levels
        opts = resolve_options(num_levels, temperature=temperature, expert_strength=expert_strength,
                               level_weights=level_weights, gate_weight=gate_weight,
                               expert_weight=expert_weight, ignore_index=ignore_index)
        check_reduction(reduction)
        if isinstance(process_group, bool) or not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        sparse = isinstance(teacher, TopKTeacher)
        try:
            resolved = resolve_sharded_backend(backend, student_2d.device, student_2d.dtype, num_levels,
                                               sparse)
        except RuntimeError as exc:  # an unavailable kernel: every rank must learn of it too
            raise ValueError(str(exc)) from exc
        impl = BACKENDS[resolved].load_phases()
        impl.check_inputs(student_2d, teacher.values if sparse else inputs.teacher)
        if not isinstance(return_stats, bool):
            raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
        divisor = check_num_items_in_batch(num_items_in_batch, reduction, student_2d.device)
    except (ValueError, TypeError) as exc:
        local_error = exc  # every rank must learn of it before the first heavy collective
        agree_on_inputs(comm, local_error)

    class_offset, num_classes = agree_on_inputs(
        comm, None, num_classes=student_2d.shape[1], num_rows=student_2d.shape[0],
        num_levels=opts.num_levels, target=target_1d, ignore_index=opts.ignore_index,
        teacher_indices=teacher.indices[~torch.isneginf(teacher.values)] if sparse else None,
        settings=(opts, reduction, teacher.kind if sparse else "dense",
                  None if isinstance(num_items_in_batch, Tensor) else num_items_in_batch))
    acc = accumulation_dtype(student_2d.dtype)
    width = student_2d.shape[1]
    if sparse:
        rows = topk_rows(teacher, inputs.teacher_levels, opts.num_levels, student_2d.shape[0], num_classes)
        loader = impl.top_k_teacher(rows, class_offset, width, opts, acc)
    else:
        loader = impl.dense_teacher(inputs.teacher.detach(), opts, acc)
    loss, log_likelihood, agreement = phases.phased_loss(
        student_2d, loader, target_1d, opts, reduction=reduction, num_classes=num_classes,
        num_items_in_batch=divisor, combine=comm, class_offset=class_offset, impl=impl)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, MoEKDStats(log_likelihood.reshape(target.shape), agreement.reshape(target.shape))
