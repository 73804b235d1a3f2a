"""The loss in three phases over a slice of the classes, in PyTorch.

The fused kernels take a whole row in one call. A caller that holds only a
contiguous slice of each row's classes (vocab-parallel training) needs the same
math split where the sums over classes are, so that it can combine the slices'
partial results between the phases (docs/math.md, "Extensions"):

1. ``row_maxima`` then ``row_sums_of_exp``: the per-row maxima of s and of
   t_ℓ/τ_ℓ, then, given the global maxima, the sums of exp(s − M), exp((s − M)/τ_ℓ)
   and exp(t_ℓ/τ_ℓ − M_ℓ). Combined across slices by MAX, then by SUM.
2. ``estep_sums``: given the global log-normalisers, the per-row sums of the
   u-weighted terms of the E-step over this slice. Combined by SUM.
3. ``finalize`` (the same on every slice, from the combined sums) gives the loss,
   the stats and the row constants A and R_ℓ, and ``slice_gradient`` the gradient
   of this slice's classes.

All of it is O(L·N·C_r) work in the accumulation dtype (float32, or float64 for
float64 logits), with only per-row vectors crossing between phases.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .options import MoEKDOptions


class Normalisers(NamedTuple):
    """Global per-row log-normalisers: log σ = s − lse_s, log q_ℓ = (s − max_s)/τ_ℓ − log_z_q[ℓ],
    log π_ℓ = t_ℓ/τ_ℓ − lse_t[ℓ]."""

    max_s: Tensor    # (N,)
    lse_s: Tensor    # (N,)
    log_z_q: Tensor  # (L, N)
    lse_t: Tensor    # (L, N)


class RowTerms(NamedTuple):
    """What phase 3 needs per row, and what the caller reports."""

    loss: Tensor            # (N,) unreduced; 0 at ignored rows
    log_likelihood: Tensor  # (N,)
    agreement: Tensor       # (N,)
    inv_G: Tensor           # (N,)
    A: Tensor               # (N,)   Σ_ℓc r_ℓc / D_ℓc
    R: Tensor               # (L, N) Σ_c r_ℓc


def _scaled_teacher(teacher: Tensor, opts: MoEKDOptions, acc: torch.dtype) -> Tensor:
    inv_tau = torch.tensor([1.0 / t for t in opts.temperatures], dtype=acc, device=teacher.device)
    return teacher.to(acc) * inv_tau[:, None, None]


def row_maxima(student: Tensor, teacher: Tensor, opts: MoEKDOptions, acc: torch.dtype) -> Tensor:
    """(1 + L, N): max_c s, then max_c t_ℓ/τ_ℓ per level. Combine by MAX."""
    return torch.cat([student.to(acc).amax(1)[None], _scaled_teacher(teacher, opts, acc).amax(2)])


def row_sums_of_exp(student: Tensor, teacher: Tensor, opts: MoEKDOptions, maxima: Tensor) -> Tensor:
    """(1 + 2L, N): Σ exp(s − M), Σ_ℓ exp((s − M)/τ_ℓ), Σ_ℓ exp(t_ℓ/τ_ℓ − M_ℓ), with the
    global maxima M. Combine by SUM."""
    acc = maxima.dtype
    shifted = student.to(acc) - maxima[0][:, None]
    inv_tau = torch.tensor([1.0 / t for t in opts.temperatures], dtype=acc, device=student.device)
    z_s = shifted.exp().sum(1)
    z_q = (shifted[None] * inv_tau[:, None, None]).exp().sum(2)
    z_t = (_scaled_teacher(teacher, opts, acc) - maxima[1:][:, :, None]).exp().sum(2)
    return torch.cat([z_s[None], z_q, z_t])


def normalisers(maxima: Tensor, sums: Tensor, num_levels: int) -> Normalisers:
    max_s = maxima[0]
    return Normalisers(max_s, max_s + sums[0].log(), sums[1:1 + num_levels].log(),
                       maxima[1:] + sums[1 + num_levels:].log())


class _SliceTerms(NamedTuple):
    sigma: Tensor     # (N, C_r)
    log_q: Tensor     # (L, N, C_r)
    D: Tensor         # (L, N, C_r)
    u: Tensor         # (L, N, C_r)
    onehot: Tensor    # (N, C_r) bool: the target's class, where this slice holds it
    owns_y: Tensor    # (N,) bool
    local_y: Tensor   # (N, 1) the target's index in this slice (0 where not held)


def _slice_terms(student: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
                 norm: Normalisers, class_offset: int) -> _SliceTerms:
    acc = norm.lse_s.dtype
    num_classes = student.shape[1]
    s = student.to(acc)
    log_sigma = s - norm.lse_s[:, None]
    sigma = log_sigma.exp()
    inv_tau = torch.tensor([1.0 / t for t in opts.temperatures], dtype=acc, device=s.device)
    log_q = (s - norm.max_s[:, None])[None] * inv_tau[:, None, None] - norm.log_z_q[:, :, None]
    pi = (_scaled_teacher(teacher, opts, acc) - norm.lse_t[:, :, None]).exp()

    local = target.long() - class_offset
    owns_y = (target != opts.ignore_index) & (local >= 0) & (local < num_classes)
    local_y = torch.where(owns_y, local, torch.zeros_like(local))[:, None]
    onehot = torch.zeros_like(s, dtype=torch.bool).scatter_(1, local_y, owns_y[:, None])

    expm1_beta = torch.tensor([math.expm1(b) for b in opts.expert_strengths], dtype=acc, device=s.device)
    exp_beta = torch.tensor([math.exp(b) for b in opts.expert_strengths], dtype=acc, device=s.device)
    weights = torch.tensor(opts.level_weights, dtype=acc, device=s.device)
    D = 1.0 + expm1_beta[:, None, None] * sigma[None]
    boost = torch.where(onehot[None], exp_beta[:, None, None], torch.ones((), dtype=acc, device=s.device))
    u = weights[:, None, None] * pi * boost / D
    return _SliceTerms(sigma, log_q, D, u, onehot, owns_y, local_y)


def estep_sums(student: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
               norm: Normalisers, class_offset: int) -> Tensor:
    """(3 + 3L, N) partial sums over this slice; combine by SUM. Rows:

    Σ_ℓc u/D, Σ_ℓc u log D, log σ_y (where this slice holds y, else 0),
    Σ_c u_ℓc (L rows), Σ_c u_ℓc log q_ℓc (L rows, 0 · log 0 = 0), u_ℓy (L rows, 0 where y is
    elsewhere).
    """
    terms = _slice_terms(student, teacher, target, opts, norm, class_offset)
    u = terms.u
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    s_y = student.to(u.dtype).gather(1, terms.local_y).squeeze(1)
    log_sigma_y = torch.where(terms.owns_y, s_y - norm.lse_s, zero)
    u_y = torch.where(terms.owns_y[None], u.gather(2, terms.local_y[None].expand(u.shape[0], -1, -1)
                                                   ).squeeze(2), zero)
    return torch.cat([
        (u / terms.D).sum((0, 2))[None],
        (u * terms.D.log()).sum((0, 2))[None],
        log_sigma_y[None],
        u.sum(2),
        torch.where(u == 0, zero, u * terms.log_q).sum(2),
        u_y,
    ])


def finalize(sums: Tensor, target: Tensor, opts: MoEKDOptions) -> RowTerms:
    """Loss, stats and the phase-3 row constants from the combined E-step sums."""
    num_levels = opts.num_levels
    u_over_D, u_log_D, log_sigma_y = sums[0], sums[1], sums[2]
    u_level = sums[3:3 + num_levels]
    u_log_q = sums[3 + num_levels:3 + 2 * num_levels]
    u_target = sums[3 + 2 * num_levels:]
    G = u_level.sum(0)
    inv_G = 1.0 / G
    betas = torch.tensor(opts.expert_strengths, dtype=sums.dtype, device=sums.device)
    taus = torch.tensor(opts.temperatures, dtype=sums.dtype, device=sums.device)
    r_y = u_target * inv_G
    agreement = r_y.sum(0).clamp(max=1.0)
    log_likelihood = log_sigma_y + G.log()
    loss = torch.zeros_like(G)
    if opts.expert_weight != 0.0:  # a zero weight drops its term: no 0 · inf from a masked target
        expert_ll = log_sigma_y + (betas[:, None] * r_y).sum(0) - u_log_D * inv_G
        loss = loss - opts.expert_weight * expert_ll
    if opts.gate_weight != 0.0:
        loss = loss - opts.gate_weight * ((taus * taus)[:, None] * u_log_q).sum(0) * inv_G
    valid = target != opts.ignore_index
    zero = torch.zeros_like(G)
    return RowTerms(torch.where(valid, loss, zero), torch.where(valid, log_likelihood, zero),
                    torch.where(valid, agreement, zero), inv_G, u_over_D * inv_G, u_level * inv_G)


def slice_gradient(student: Tensor, teacher: Tensor, target: Tensor, opts: MoEKDOptions,
                   norm: Normalisers, rows: RowTerms, class_offset: int,
                   grad_scale: Optional[Tensor] = None) -> Tensor:
    """∂loss/∂s for this slice's classes (docs/math.md, "Gradient"), times ``grad_scale``,
    in the student's dtype; 0 at ignored rows."""
    terms = _slice_terms(student, teacher, target, opts, norm, class_offset)
    acc = terms.u.dtype
    r = terms.u * rows.inv_G[None, :, None]
    grad = torch.zeros_like(terms.sigma)
    if opts.expert_weight != 0.0:
        grad += opts.expert_weight * (terms.sigma * rows.A[:, None] + (r * (1.0 - 1.0 / terms.D)).sum(0)
                                      - terms.onehot.to(acc))
    if opts.gate_weight != 0.0:
        taus = torch.tensor(opts.temperatures, dtype=acc, device=grad.device)
        q = terms.log_q.exp()
        grad += opts.gate_weight * (taus[:, None, None] * (rows.R[:, :, None] * q - r)).sum(0)
    if grad_scale is not None:
        grad = grad * grad_scale.to(acc)
    valid = (target != opts.ignore_index)[:, None]
    return torch.where(valid, grad, torch.zeros_like(grad)).to(student.dtype)
