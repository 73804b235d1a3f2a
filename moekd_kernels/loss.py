"""Public API: ``fused_moe_kd_loss`` and its ``nn.Module`` form ``MoEKDLoss``."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .backends import check_backend_name, resolve_backend
from .ops import moe_kd_loss
from .teachers import TopKTeacher, flatten_teacher_inputs, topk_rows
from .vocab_parallel import check_process_group, sharded_moe_kd_loss
from .options import (
    PerLevel,
    check_num_items_in_batch,
    check_reduction,
    option_levels,
    resolve_options,
)


class MoEKDStats(NamedTuple):
    """Per-row diagnostics, detached, shaped like ``target``; 0 at ignored rows.

    float32 (float64 when the student logits are float64, like the loss).

    log_likelihood: m = log Σ_ℓc w_ℓ π_ℓc p_ℓc(y), the marginal log-likelihood of the
        label that EM increases.
    agreement: a = Σ_ℓ r_ℓy, the posterior probability that the teacher's prediction
        is the true label.
    """

    log_likelihood: Tensor
    agreement: Tensor


def fused_moe_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: PerLevel = 4.0,
    expert_strength: PerLevel = 2.0,
    level_weights: Optional[Sequence[float]] = None,
    gate_weight: float = 1.0,
    expert_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    process_group=None,
) -> Union[Tensor, Tuple[Tensor, MoEKDStats]]:
    """MoE-KD distillation loss with its gradient fused into the forward pass.

    Args:
        student_logits: ``(..., C)`` float32, bfloat16, float16 or float64.
        teacher_logits: ``(..., C)`` for one level or ``(L, ..., C)`` for L levels;
            any floating dtype; or a :class:`TopKTeacher` (a teacher stored as its top-k).
            Treated as constants: they get no gradient. A ``(..., C)`` teacher with
            per-level option sequences of length L is L levels of the same logits
            (e.g. one head at L temperatures), not copied.
        target: ``(...)`` integer class indices in ``[0, C)`` or ``ignore_index``
            (int64, int32, int16, int8 or uint8; compared as int64).
        temperature: τ, one float or one per level, in [1e-4, 1e4].
        expert_strength: β, one float or one per level (in [0, 50]).
        level_weights: one weight per level (>= 0, normalised to sum 1); default uniform.
        gate_weight: λ_g, weight of the gate term (student learns the corrected teacher),
            in [0, 1e8].
        expert_weight: λ_e, weight of the expert log-likelihood term, in [0, 1e8].
        ignore_index: rows with this target contribute 0 and get a zero gradient.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"``.
        backend: ``"auto"`` or a name from ``moekd_kernels.backend_names()``.
        return_stats: also return :class:`MoEKDStats`.
        num_items_in_batch: an int > 0 or a 0-dim tensor (never read on the host):
            the loss is then the sum over non-ignored rows divided by it, the Hugging
            Face / TRL convention for gradient accumulation (the token count of all
            micro-batches of one optimizer step). Only with ``reduction="mean"``, whose
            divisor it replaces.
        process_group: a ``torch.distributed`` group over which the classes are sharded:
            each rank passes the logits of its contiguous class slice (in rank order) and
            the global target, and gets the unsharded loss and stats and its slice's gradient.

    The gradient is computed in the forward pass only when it can be needed (grad
    mode on and ``student_logits.requires_grad``); evaluation under ``torch.no_grad()``
    or ``torch.inference_mode()`` skips it and its N×C buffer. The gradient is first
    order: double backward (``create_graph=True``) through the loss raises.

    Returns:
        The loss (float32; float64 for float64 logits), scalar or shaped like
        ``target`` for ``reduction="none"``; with ``return_stats``, ``(loss, stats)``.
    """
    if process_group is not None:
        return sharded_moe_kd_loss(
            student_logits, teacher_logits, target, process_group=process_group,
            temperature=temperature, expert_strength=expert_strength, level_weights=level_weights,
            gate_weight=gate_weight, expert_weight=expert_weight, ignore_index=ignore_index,
            reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend,
            return_stats=return_stats)
    inputs = flatten_teacher_inputs(student_logits, teacher_logits, target,
                                    option_levels(temperature, expert_strength, level_weights))
    student_2d, target_1d, num_levels = inputs.student, inputs.target, inputs.num_levels
    top_k = isinstance(inputs.teacher, TopKTeacher)
    opts = resolve_options(
        num_levels,
        temperature=temperature,
        expert_strength=expert_strength,
        level_weights=level_weights,
        gate_weight=gate_weight,
        expert_weight=expert_weight,
        ignore_index=ignore_index,
    )
    check_reduction(reduction)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    num_items = check_num_items_in_batch(num_items_in_batch, reduction, student_2d.device)
    chosen = resolve_backend(backend, student_2d.device, student_2d.dtype, opts.num_levels, top_k)
    # Under no_grad / inference_mode (grad mode off) or for logits that need no gradient,
    # the backends skip the gradient pass and its N×C buffer.
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if top_k:
        rows = topk_rows(inputs.teacher, inputs.teacher_levels, opts.num_levels, student_2d.shape[0],
                         student_2d.shape[1])
        teacher_values, teacher_indices, teacher_rest = rows.values, rows.indices, rows.rest
    else:
        teacher_values, teacher_indices, teacher_rest = inputs.teacher.detach(), None, None

    loss, log_likelihood, agreement, _ = moe_kd_loss(
        student_2d,
        teacher_values,
        target_1d,
        list(opts.temperatures),
        list(opts.expert_strengths),
        list(opts.level_weights),
        opts.gate_weight,
        opts.expert_weight,
        opts.ignore_index,
        chosen,
        reduction,
        need_grad,
        num_items,
        teacher_indices,
        teacher_rest,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)

    if not return_stats:
        return loss
    stats = MoEKDStats(log_likelihood.reshape(target.shape), agreement.reshape(target.shape))
    return loss, stats


class MoEKDLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_moe_kd_loss`, with the same options and defaults."""

    def __init__(
        self,
        *,
        temperature: PerLevel = 4.0,
        expert_strength: PerLevel = 2.0,
        level_weights: Optional[Sequence[float]] = None,
        gate_weight: float = 1.0,
        expert_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        return_stats: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        # Fail at construction for what can be checked without the tensors.
        check_reduction(reduction)
        check_backend_name(backend)
        if process_group is not None:
            check_process_group(process_group)
        resolve_options(
            option_levels(temperature, expert_strength, level_weights) or 1,
            temperature=temperature,
            expert_strength=expert_strength,
            level_weights=level_weights,
            gate_weight=gate_weight,
            expert_weight=expert_weight,
            ignore_index=ignore_index,
        )
        self.temperature = temperature
        self.expert_strength = expert_strength
        self.level_weights = level_weights
        self.gate_weight = gate_weight
        self.expert_weight = expert_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
                num_items_in_batch: Optional[Union[int, Tensor]] = None):
        """See :func:`fused_moe_kd_loss`; ``num_items_in_batch`` is per call (it changes per batch)."""
        return fused_moe_kd_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            expert_strength=self.expert_strength,
            level_weights=self.level_weights,
            gate_weight=self.gate_weight,
            expert_weight=self.expert_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
            return_stats=self.return_stats,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        backend = self.backend
        if backend == "auto":
            from .backends import describe_auto

            backend = f"auto ({describe_auto()})"
        return (
            f"temperature={self.temperature}, expert_strength={self.expert_strength}, "
            f"level_weights={self.level_weights}, gate_weight={self.gate_weight}, "
            f"expert_weight={self.expert_weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={backend}"
        )
