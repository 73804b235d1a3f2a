"""MoE-KD with the classes sharded over a ``torch.distributed`` process group.

Rank r holds the logits of the contiguous class slice [o_r, o_r + C_r), the
slices in rank order; the target holds global class indices and is the same on
every rank. The three phases of ``phases.py`` run on each slice, and between
them the per-row partial results cross the group as all-reduces:

    agreement   all_gather of 9 int64 per rank        slice sizes, shapes, target and option checks
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
from .options import MoEKDOptions
from .reference import accumulation_dtype

_AGREEMENT_FIELDS = 9


class Communicator:
    """The group's collectives, counted: the tests assert how many run and what they carry."""

    def __init__(self, group) -> None:
        self.group = group
        self.calls = 0
        self.bytes_per_row = 0

    def all_reduce(self, tensor: Tensor, op) -> Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        self.calls += 1
        self.bytes_per_row += tensor.element_size() * (tensor.numel() // max(tensor.shape[-1], 1))
        return tensor

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


def agree_on_inputs(comm: Communicator, local_error: Optional[BaseException], *, num_classes: int,
                    num_rows: int, num_levels: int, target: Optional[Tensor], ignore_index: int,
                    settings) -> Tuple[int, int]:
    """One all_gather; every rank raises if any rank's inputs are bad. Returns
    (this rank's class offset, the total class count)."""
    device = target.device if target is not None else torch.device("cpu")
    fields = torch.zeros(_AGREEMENT_FIELDS, dtype=torch.int64)
    if local_error is None:
        valid = target[target != ignore_index].long()
        fields[:] = torch.tensor([
            0, num_classes, num_rows, num_levels,
            int(valid.min()) if valid.numel() else 0,
            int(valid.max()) if valid.numel() else -1,
            _target_checksum(target), _fingerprint(settings), valid.numel(),
        ])
    else:
        fields[0] = 1
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
    has_valid = gathered[:, 8] > 0
    if bool(has_valid.any()):
        low, high = int(gathered[has_valid, 4].min()), int(gathered[has_valid, 5].max())
        if low < 0 or high >= total:
            raise ValueError(f"target values must be in [0, {total}) (the classes of all ranks' slices) "
                             f"or equal ignore_index={ignore_index}, got {low if low < 0 else high}")
    for column, what in ((2, "rows (the target's size)"), (3, "teacher levels"),
                         (6, "target values"), (7, "options (temperature, expert_strength, "
                                                  "level_weights, weights, ignore_index, reduction)")):
        differs = (gathered[:, column] != gathered[0, column]).nonzero().flatten()
        if differs.numel():
            raise ValueError(f"process_group: every rank must pass the same {what}; rank 0 and "
                             f"rank {int(differs[0])} differ")
    return int(widths[:rank].sum()), total


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, opts, comm, class_offset, divisor, reduction, need_grad):
        acc = accumulation_dtype(student.dtype)
        maxima = comm.all_reduce(phases.row_maxima(student, teacher, opts, acc), dist.ReduceOp.MAX)
        sums = comm.all_reduce(phases.row_sums_of_exp(student, teacher, opts, maxima), dist.ReduceOp.SUM)
        norm = phases.normalisers(maxima, sums, opts.num_levels)
        estep = comm.all_reduce(phases.estep_sums(student, teacher, target, opts, norm, class_offset),
                                dist.ReduceOp.SUM)
        rows = phases.finalize(estep, target, opts)

        grad_scale = None if divisor is None else 1.0 / divisor.to(acc)
        grad = (phases.slice_gradient(student, teacher, target, opts, norm, rows, class_offset, grad_scale)
                if need_grad else None)
        loss = rows.loss
        if reduction != "none":
            loss = loss.sum() if divisor is None else loss.sum() / divisor.to(acc)
        ctx.mark_non_differentiable(rows.log_likelihood, rows.agreement)
        ctx.save_for_backward(grad)
        ctx.rows = student.shape[0]
        return loss, rows.log_likelihood, rows.agreement

    @staticmethod
    def backward(ctx, grad_loss, _grad_ll, _grad_agreement):
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("moekd_kernels: the vocab-parallel loss was computed without its gradient "
                               "(grad mode was off or student_logits did not require grad)")
        if torch.is_grad_enabled():
            raise RuntimeError("moekd_kernels: double backward through the vocab-parallel MoE-KD loss is "
                               "not supported (its gradient is first-order only)")
        factor = grad_loss.expand(ctx.rows).to(grad.dtype if grad.dtype == torch.float64 else torch.float32)
        return ((grad * factor[:, None]).to(grad.dtype),) + (None,) * 8


def vocab_parallel_loss(student: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
                        comm: Communicator, class_offset: int, reduction: str,
                        num_items_in_batch) -> Tuple[Tensor, Tensor, Tensor]:
    """student (N, C_r), teacher (L, N, C_r), target (N,) global indices → (loss, ll (N,), agreement (N,)).

    The loss is reduced over the whole (unsharded) rows, the same on every rank; its
    gradient with respect to ``student`` is this rank's slice.
    """
    acc = accumulation_dtype(student.dtype)
    if num_items_in_batch is not None:
        divisor = torch.as_tensor(num_items_in_batch, device=student.device).to(acc)
    elif reduction == "mean":
        divisor = (target != opts.ignore_index).sum().clamp_min(1).to(acc)
    else:
        divisor = None
    need_grad = torch.is_grad_enabled() and student.requires_grad
    return _VocabParallelLoss.apply(student, teacher.detach(), target, opts, comm, class_offset,
                                    divisor, reduction, need_grad)


def sharded_moe_kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
                        process_group, temperature, expert_strength, level_weights, gate_weight,
                        expert_weight, ignore_index, reduction, num_items_in_batch, backend,
                        return_stats):
    """``fused_moe_kd_loss(..., process_group=group)``: see the module docstring."""
    from .backends import check_backend_name
    from .options import check_reduction, flatten_inputs, resolve_options

    global last_communicator
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given, but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    comm = Communicator(process_group)
    last_communicator = comm
    local_error: Optional[BaseException] = None
    student_2d = teacher_3d = target_1d = opts = None
    try:
        if isinstance(process_group, bool) or not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        student_2d, teacher_3d, target_1d = flatten_inputs(student_logits, teacher_logits, target)
        opts = resolve_options(teacher_3d.shape[0], temperature=temperature,
                               expert_strength=expert_strength, level_weights=level_weights,
                               gate_weight=gate_weight, expert_weight=expert_weight,
                               ignore_index=ignore_index)
        check_reduction(reduction)
        check_backend_name(backend)
        if not isinstance(return_stats, bool):
            raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, Tensor)):
                raise TypeError("num_items_in_batch must be None, an int or a 0-dim tensor, "
                                f"got {type(num_items_in_batch).__name__}")
            if reduction == "none":
                raise ValueError("num_items_in_batch divides a summed loss; it cannot be used with "
                                 "reduction='none'")
    except (ValueError, TypeError) as exc:  # every rank must learn of it: see agree_on_inputs
        local_error = exc
    if local_error is not None:
        agree_on_inputs(comm, local_error, num_classes=0, num_rows=0, num_levels=0, target=None,
                        ignore_index=0, settings=None)
    target_1d = target_1d.long()
    settings = (opts, reduction, None if isinstance(num_items_in_batch, Tensor) else num_items_in_batch)
    class_offset, _ = agree_on_inputs(comm, None, num_classes=student_2d.shape[1],
                                      num_rows=student_2d.shape[0], num_levels=opts.num_levels,
                                      target=target_1d, ignore_index=opts.ignore_index,
                                      settings=settings)
    loss, log_likelihood, agreement = vocab_parallel_loss(
        student_2d, teacher_3d, target_1d, opts, comm, class_offset, reduction, num_items_in_batch)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    from .loss import MoEKDStats

    return loss, MoEKDStats(log_likelihood.reshape(target.shape), agreement.reshape(target.shape))
