"""Pure-PyTorch MoE-KD: the closed forms, written for reading, not for speed.

Symbols follow docs/math.md (Definitions):

    σ       = softmax(s)                   student prediction
    q_ℓ     = softmax(s / τ_ℓ)             student's guess of the teacher at level ℓ
    π_ℓ     = softmax(t_ℓ / τ_ℓ)           gate: teacher classifier at level ℓ
    D_ℓc    = 1 + expm1(β_ℓ) σ_c           normaliser of expert (ℓ, c)
    u_ℓc    = w_ℓ π_ℓc exp(β_ℓ [c=y]) / D_ℓc
    G       = Σ_ℓc u_ℓc,   r = u / G       E-step responsibilities (held fixed)

Per row:  loss = −λ_e Σ r log p_ℓc(y) − λ_g Σ_ℓ τ_ℓ² Σ_c r_ℓc log q_ℓc,
with  Σ_ℓc r log p_ℓc(y) = log σ_y + Σ_ℓ β_ℓ r_ℓy − Σ_ℓc r_ℓc log D_ℓc.

Everything is O(L·N·C). Low-precision inputs are computed in float32; float64
inputs stay float64 (the tests hold this to a float64 oracle).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import MoEKDOptions
from .teachers import TopKRows


class _Rows(NamedTuple):
    loss: Tensor             # (N,) per-row loss (0 where ignored)
    log_likelihood: Tensor   # (N,) m = log σ_y + log G
    agreement: Tensor        # (N,) a = Σ_ℓ r_ℓy
    grad: Tensor | None      # (N, C) ∂loss/∂s with r fixed, or None


def _xlogy_safe(weight: Tensor, log_value: Tensor) -> Tensor:
    """weight · log_value, with 0 where weight is 0 (so 0 · log 0 = 0 for masked classes)."""
    return torch.where(weight == 0, torch.zeros_like(log_value), weight * log_value)


def _moe_kd_rows(s: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
                 *, closed_form_grad: bool, e_step_logits: Tensor | None = None) -> _Rows:
    """s (N, C) in the accumulation dtype, possibly requiring grad; teacher (L, N, C).

    The responsibilities come from ``e_step_logits`` when given (the E-step point),
    else from ``s`` itself.
    """
    num_rows, num_classes = s.shape
    acc = s.dtype
    valid = target != opts.ignore_index
    in_range = (target >= 0) & (target < num_classes)
    y = torch.where(valid & in_range, target, torch.zeros_like(target)).long().unsqueeze(1)
    onehot = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y, True)

    log_sigma = F.log_softmax(s, dim=1)
    log_sigma_y = log_sigma.gather(1, y).squeeze(1)

    with torch.no_grad():  # E-step: r carries no gradient
        log_sigma0 = (log_sigma if e_step_logits is None
                      else F.log_softmax(e_step_logits.to(acc), dim=1)).detach()
        sigma0 = log_sigma0.exp()
        u_levels = []
        for level, (tau, beta, w) in enumerate(
            zip(opts.temperatures, opts.expert_strengths, opts.level_weights)
        ):
            pi = F.softmax(teacher[level].to(acc) / tau, dim=1)
            D = 1.0 + torch.expm1(torch.tensor(beta, dtype=acc)) * sigma0
            boost = torch.where(onehot, torch.tensor(beta, dtype=acc).exp(), torch.ones((), dtype=acc))
            u_levels.append(w * pi * boost / D)
        u = torch.stack(u_levels)                     # (L, N, C)
        G = u.sum(dim=(0, 2))                         # (N,)
        r = u / G[None, :, None]                      # Σ_ℓc r = 1
        agreement = r.gather(2, y.unsqueeze(0).expand(len(u_levels), -1, -1)).sum(dim=(0, 2))
        # A sum of L rounded ratios can land an ulp above 1; a is a probability.
        agreement = agreement.clamp(max=1.0)  # clamp keeps NaN
        log_likelihood = log_sigma0.gather(1, y).squeeze(1) + G.log()

    sigma = log_sigma.exp()
    expert_ll = log_sigma_y.clone()                   # Σ_ℓc r log p_ℓc(y), built up per level
    gate_ce = torch.zeros_like(log_sigma_y)           # Σ_ℓ τ² Σ_c r log q
    for level, (tau, beta) in enumerate(zip(opts.temperatures, opts.expert_strengths)):
        log_D = torch.log1p(torch.expm1(torch.tensor(beta, dtype=acc)) * sigma)
        r_l = r[level]
        expert_ll = expert_ll + beta * r_l.gather(1, y).squeeze(1) - (r_l * log_D).sum(1)
        log_q = F.log_softmax(s / tau, dim=1)
        gate_ce = gate_ce + tau * tau * _xlogy_safe(r_l, log_q).sum(1)

    # A zero weight drops its term entirely: 0 · (+inf) from a masked target must not be NaN.
    loss = torch.zeros_like(log_sigma_y)
    if opts.expert_weight != 0.0:
        loss = loss - opts.expert_weight * expert_ll
    if opts.gate_weight != 0.0:
        loss = loss - opts.gate_weight * gate_ce

    grad = None
    if closed_form_grad:
        with torch.no_grad():
            grad = torch.zeros_like(s)
            if opts.expert_weight != 0.0:
                A = torch.zeros_like(G)
                boost_terms = torch.zeros_like(s)
                for level, beta in enumerate(opts.expert_strengths):
                    D = 1.0 + torch.expm1(torch.tensor(beta, dtype=acc)) * sigma0
                    A = A + (r[level] / D).sum(1)
                    # σ_j r_j expm1(β)/D_j == r_j (1 − 1/D_j): bounded, no exp(β)·σ products
                    boost_terms = boost_terms + r[level] * (1.0 - 1.0 / D)
                grad += opts.expert_weight * (sigma0 * A[:, None] + boost_terms - onehot.to(acc))
            if opts.gate_weight != 0.0:
                for level, tau in enumerate(opts.temperatures):
                    q = F.softmax(s.detach() / tau, dim=1)
                    R = r[level].sum(1, keepdim=True)
                    grad += opts.gate_weight * tau * (R * q - r[level])
            grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))

    zero = torch.zeros_like(log_sigma_y)
    nan = torch.full_like(log_sigma_y, float("nan"))
    loss = torch.where(valid, torch.where(in_range, loss, nan), zero)
    log_likelihood = torch.where(valid, torch.where(in_range, log_likelihood, nan), zero)
    agreement = torch.where(valid, torch.where(in_range, agreement, nan), zero)
    return _Rows(loss, log_likelihood, agreement, grad)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows per block: about 2^18 elements (1 MiB in float32) per block-sized temporary.
# _moe_kd_rows holds one or two dozen of them at once (more with many levels); blocks keep
# that far below one N×C buffer, so the reference's own memory is the gradient it
# returns, or nothing when no gradient is asked for.
_BLOCK_ELEMENTS = 1 << 18


def reference_forward(student: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
                      grad_scale: Optional[Tensor] = None,
                      need_grad: bool = True) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The backend contract: (loss, log_likelihood, agreement, grad) per row.

    student (N, C), teacher (L, N, C) (any strides, level stride 0 included) or a
    ``teachers.TopKRows``, target (N,).
    ``grad`` is the closed form of docs/math.md (Gradient) times ``grad_scale`` (a 0-dim tensor on the student's
    device; None = 1), in a new buffer of the student's dtype; None when ``need_grad`` is
    False, in which case no gradient is computed. Rows are independent, so they are
    computed a block at a time.
    """
    acc = accumulation_dtype(student.dtype)
    num_rows, num_classes = student.shape
    loss, log_likelihood, agreement = (student.new_empty((num_rows,), dtype=acc) for _ in range(3))
    grad = torch.empty((num_rows, num_classes), dtype=student.dtype, device=student.device) \
        if need_grad else None
    scale = None if grad_scale is None else grad_scale.to(acc)
    block_rows = max(1, _BLOCK_ELEMENTS // num_classes)
    with torch.no_grad():
        for start in range(0, num_rows, block_rows):
            rows = slice(start, start + block_rows)
            if isinstance(teacher, TopKRows):
                block = _top_k_block(student[rows], TopKRows(*(part[:, rows] for part in teacher)),
                                     target[rows], opts, scale, need_grad)
            else:
                block = _moe_kd_rows(student[rows].to(acc), teacher[:, rows], target[rows], opts,
                                     closed_form_grad=need_grad)
                if need_grad and scale is not None:
                    # Scaled in the accumulation dtype, then rounded once to the student's dtype.
                    block = block._replace(grad=block.grad * scale)
            loss[rows] = block.loss
            log_likelihood[rows] = block.log_likelihood
            agreement[rows] = block.agreement
            if need_grad:
                grad[rows] = block.grad
    return loss, log_likelihood, agreement, grad


def _top_k_block(student: Tensor, teacher: TopKRows, target: Tensor, opts: MoEKDOptions,
                 scale: Optional[Tensor], need_grad: bool) -> _Rows:
    """A block of rows with a top-k teacher, read through its loader (phases.py): the
    closed forms above would need the dense N×C teacher."""
    from .phases import TopKTeacherSlice, slice_rows

    num_classes = student.shape[1]
    loader = TopKTeacherSlice(teacher, 0, num_classes, opts, accumulation_dtype(student.dtype))
    return _Rows(*slice_rows(student, loader, target, opts, num_classes=num_classes, grad_scale=scale,
                             need_grad=need_grad))


def reference_loss_autograd(student: Tensor, teacher: Tensor, target: Tensor,
                            opts: MoEKDOptions, e_step_logits: Tensor | None = None) -> Tensor:
    """Per-row loss as a differentiable function of ``student`` with r held fixed.

    Autograd through this gives the M-step gradient independently of the closed
    form, which is how the tests cross-check the two. With ``e_step_logits`` the
    responsibilities are those of that point, so the result is the M-step
    objective Q(s | s_0) as a function of s alone (what gradcheck can verify).
    """
    acc = accumulation_dtype(student.dtype)
    return _moe_kd_rows(student.to(acc), teacher, target, opts, closed_form_grad=False,
                        e_step_logits=e_step_logits).loss


# Backend-registry entry points.
forward = reference_forward


def unavailable_reason(device_type: str):
    return None
