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

The teacher enters through a loader with three duties (its maxima, its sums of
exponentials, and the gate π times a dense factor): ``DenseTeacherSlice`` reads
logits, ``TopKTeacherSlice`` a stored top-k teacher (K entries per row and one
value for every unlisted class), so a sparse teacher never becomes an N×C tensor.
``slice_rows`` runs the phases with a ``combine`` step between them: identity on
one device, all-reduces over a process group (``vocab_parallel.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .options import MoEKDOptions
from .reference import accumulation_dtype
from .teachers import TopKRows


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


def _inv_tau(opts: MoEKDOptions, acc: torch.dtype, device) -> Tensor:
    return torch.tensor([1.0 / t for t in opts.temperatures], dtype=acc, device=device)


class DenseTeacherSlice:
    """Teacher logits (L, N, C_r) of this slice's classes."""

    def __init__(self, logits: Tensor, opts: MoEKDOptions, acc: torch.dtype) -> None:
        self.scaled = logits.to(acc) * _inv_tau(opts, acc, logits.device)[:, None, None]  # t_ℓ/τ_ℓ

    def maxima(self) -> Tensor:
        return self.scaled.amax(2)

    def sums_of_exp(self, maxima: Tensor) -> Tensor:
        return (self.scaled - maxima[:, :, None]).exp().sum(2)

    def gate_times(self, factor: Tensor, lse: Tensor) -> Tensor:
        """factor (L, N, C_r) · π_ℓ, with π_ℓ = exp(t_ℓ/τ_ℓ − lse_ℓ)."""
        return factor * (self.scaled - lse[:, :, None]).exp()


class TopKTeacherSlice:
    """A top-k teacher (docs/math.md, "Extensions"; ``teachers.TopKRows``): for each level
    and row, K listed classes with their values (−inf: padding), and one logit shared by
    every unlisted class. This slice holds the global classes [class_offset, class_offset +
    width).
    """

    def __init__(self, rows: TopKRows, class_offset: int, width: int, opts: MoEKDOptions,
                 acc: torch.dtype) -> None:
        values = rows.values.to(acc)
        listed = ~torch.isneginf(values)  # −inf is padding; NaN is data and propagates
        inv_tau = _inv_tau(opts, acc, values.device)[:, None]
        indices, rest = rows.indices, rows.rest.to(acc)
        local = indices.long() - class_offset
        self.in_slice = listed & (local >= 0) & (local < width)
        # Entries outside the slice are sent to a spare column past its end.
        self.local = torch.where(self.in_slice, local, torch.full_like(local, width))
        self.scaled = torch.where(self.in_slice, values * inv_tau[:, :, None], -math.inf)
        self.rest_scaled = rest * inv_tau                       # (L, N)
        self.num_rest = width - self.in_slice.sum(2)           # unlisted classes in this slice
        self.width = width

    def maxima(self) -> Tensor:
        rest = torch.where(self.num_rest > 0, self.rest_scaled, -math.inf)
        return torch.maximum(self.scaled.amax(2), rest)

    def sums_of_exp(self, maxima: Tensor) -> Tensor:
        listed = (self.scaled - maxima[:, :, None]).exp().sum(2)
        rest = torch.where(self.num_rest > 0, self.num_rest * (self.rest_scaled - maxima).exp(), 0.0)
        return listed + rest

    def gate_times(self, factor: Tensor, lse: Tensor) -> Tensor:
        out = torch.cat([factor * (self.rest_scaled - lse).exp()[:, :, None],
                         factor.new_zeros(factor.shape[:2] + (1,))], dim=2)
        listed = torch.cat([factor, factor.new_zeros(factor.shape[:2] + (1,))], dim=2).gather(2, self.local)
        listed = listed * (self.scaled - lse[:, :, None]).exp()
        return out.scatter(2, self.local, listed)[:, :, :self.width]


def row_maxima(student: Tensor, teacher, acc: torch.dtype) -> Tensor:
    """(1 + L, N): max_c s, then max_c t_ℓ/τ_ℓ per level. Combine by MAX."""
    return torch.cat([student.to(acc).amax(1)[None], teacher.maxima()])


def row_sums_of_exp(student: Tensor, teacher, opts: MoEKDOptions, maxima: Tensor) -> Tensor:
    """(1 + 2L, N): Σ exp(s − M), Σ_ℓ exp((s − M)/τ_ℓ), Σ_ℓ exp(t_ℓ/τ_ℓ − M_ℓ), with the
    global maxima M. Combine by SUM."""
    acc = maxima.dtype
    shifted = student.to(acc) - maxima[0][:, None]
    inv_tau = _inv_tau(opts, acc, student.device)
    z_s = shifted.exp().sum(1)
    z_q = (shifted[None] * inv_tau[:, None, None]).exp().sum(2)
    return torch.cat([z_s[None], z_q, teacher.sums_of_exp(maxima[1:])])


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


def _slice_terms(student: Tensor, teacher, target: Tensor, opts: MoEKDOptions,
                 norm: Normalisers, class_offset: int) -> _SliceTerms:
    acc = norm.lse_s.dtype
    num_classes = student.shape[1]
    s = student.to(acc)
    log_sigma = s - norm.lse_s[:, None]
    sigma = log_sigma.exp()
    inv_tau = _inv_tau(opts, acc, s.device)
    log_q = (s - norm.max_s[:, None])[None] * inv_tau[:, None, None] - norm.log_z_q[:, :, None]

    local = target.long() - class_offset
    owns_y = (target != opts.ignore_index) & (local >= 0) & (local < num_classes)
    local_y = torch.where(owns_y, local, torch.zeros_like(local))[:, None]
    onehot = torch.zeros_like(s, dtype=torch.bool).scatter_(1, local_y, owns_y[:, None])

    expm1_beta = torch.tensor([math.expm1(b) for b in opts.expert_strengths], dtype=acc, device=s.device)
    exp_beta = torch.tensor([math.exp(b) for b in opts.expert_strengths], dtype=acc, device=s.device)
    weights = torch.tensor(opts.level_weights, dtype=acc, device=s.device)
    D = 1.0 + expm1_beta[:, None, None] * sigma[None]
    boost = torch.where(onehot[None], exp_beta[:, None, None], torch.ones((), dtype=acc, device=s.device))
    u = teacher.gate_times(weights[:, None, None] * boost / D, norm.lse_t)
    return _SliceTerms(sigma, log_q, D, u, onehot, owns_y, local_y)


def estep_sums(student: Tensor, teacher, target: Tensor, opts: MoEKDOptions,
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


def finalize(sums: Tensor, target: Tensor, opts: MoEKDOptions, num_classes: int) -> RowTerms:
    """Loss, stats and the phase-3 row constants from the combined E-step sums. A row whose
    target is outside [0, num_classes) (and not ignored) is NaN, as in the kernels."""
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
    out_of_range = valid & ((target < 0) | (target >= num_classes))
    loss, log_likelihood, agreement = (torch.where(out_of_range, math.nan, torch.where(valid, v, zero))
                                       for v in (loss, log_likelihood, agreement))
    return RowTerms(loss, log_likelihood, agreement, inv_G, u_over_D * inv_G, u_level * inv_G)


def slice_gradient(student: Tensor, teacher, target: Tensor, opts: MoEKDOptions,
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


class TorchPhases:
    """The phase functions in PyTorch, as a backend exposes them (``backends.Backend.phases``):
    the loaders of a slice's teacher, then the three phases. A kernel backend's object has the
    same members and takes the loaders it builds itself."""

    @staticmethod
    def check_inputs(student: Tensor, teacher: Tensor) -> None:
        """Anything PyTorch computes with is taken."""

    dense_teacher = DenseTeacherSlice
    top_k_teacher = TopKTeacherSlice
    row_maxima = staticmethod(row_maxima)
    row_sums_of_exp = staticmethod(row_sums_of_exp)
    estep_sums = staticmethod(estep_sums)
    slice_gradient = staticmethod(slice_gradient)


PYTORCH = TorchPhases()


class SliceTeacher(NamedTuple):
    """The teacher of a class slice as a phase kernel takes it: dense logits (L, N, C_r), or
    a top-k teacher (global indices) and the slice's first class."""

    dense: Optional[Tensor]
    rows: Optional[TopKRows]
    class_offset: int
    opts: MoEKDOptions


def normaliser_rows(norm: Normalisers) -> Tensor:
    """``norm`` as a kernel's (2 + 2L, N) rows: max_s, lse_s, log_z_q (L), lse_t (L)."""
    return torch.cat([norm.max_s[None], norm.lse_s[None], norm.log_z_q, norm.lse_t])


class KernelPhases:
    """``TorchPhases``' members for a kernel with one entry point per phase,
    ``run(phase, student, teacher, target, row_in, grad_scale)``: phase 0–2 return their
    (rows, N) float32 table, phase 3 the (N, C_r) gradient. ``row_in``: the global maxima
    (phase 1); the normalisers' rows (phase 2); those, then inv_G, A and R_ℓ (phase 3).
    A backend gives ``check_inputs`` and ``run``."""

    def dense_teacher(self, logits: Tensor, opts: MoEKDOptions, acc: torch.dtype) -> SliceTeacher:
        return SliceTeacher(logits, None, 0, opts)

    def top_k_teacher(self, rows: TopKRows, class_offset: int, width: int, opts: MoEKDOptions,
                      acc: torch.dtype) -> SliceTeacher:
        return SliceTeacher(None, rows, class_offset, opts)

    def row_maxima(self, student, teacher: SliceTeacher, acc):
        return self.run(0, student, teacher, None, None)

    def row_sums_of_exp(self, student, teacher: SliceTeacher, opts, maxima):
        return self.run(1, student, teacher, None, maxima)

    def estep_sums(self, student, teacher: SliceTeacher, target, opts, norm, class_offset):
        return self.run(2, student, teacher._replace(class_offset=class_offset), target, normaliser_rows(norm))

    def slice_gradient(self, student, teacher: SliceTeacher, target, opts, norm, rows, class_offset,
                       grad_scale=None):
        row_in = torch.cat([normaliser_rows(norm), rows.inv_G[None], rows.A[None], rows.R])
        return self.run(3, student, teacher._replace(class_offset=class_offset), target, row_in, grad_scale)


class LocalCombine:
    """``slice_rows``' combine step on one device: the slice is the whole row."""

    def max_(self, tensor: Tensor) -> Tensor:
        return tensor

    def sum_(self, tensor: Tensor) -> Tensor:
        return tensor


def slice_rows(student: Tensor, teacher, target: Tensor, opts: MoEKDOptions, *, num_classes: int,
               grad_scale: Optional[Tensor] = None, need_grad: bool = True, combine=None,
               class_offset: int = 0, impl=PYTORCH) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The backend contract's (loss, log_likelihood, agreement, grad) for the rows whose
    classes [class_offset, class_offset + C_r) of ``num_classes`` are ``student`` (N, C_r),
    with ``teacher`` the loader of the same slice (built by ``impl``, whose phase functions
    run); ``combine`` joins the slices' partial results between the phases (None: this
    slice is the whole row)."""
    combine = combine or LocalCombine()
    acc = accumulation_dtype(student.dtype)
    maxima = combine.max_(impl.row_maxima(student, teacher, acc).to(acc))
    norm = normalisers(maxima, combine.sum_(impl.row_sums_of_exp(student, teacher, opts, maxima).to(acc)),
                       opts.num_levels)
    sums = impl.estep_sums(student, teacher, target, opts, norm, class_offset).to(acc)
    rows = finalize(combine.sum_(sums), target, opts, num_classes)
    grad = (impl.slice_gradient(student, teacher, target, opts, norm, rows, class_offset, grad_scale)
            if need_grad else None)
    return rows.loss, rows.log_likelihood, rows.agreement, grad
