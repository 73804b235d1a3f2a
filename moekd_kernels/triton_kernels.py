"""The fused MoE-KD Triton kernels: one program per row, loss + stats + gradient, for a
dense or a top-k teacher; and the phase kernel, the same passes over a slice of the classes.

Symbols as in docs/math.md, definitions (one row; C classes; L levels):

    σ = softmax(s),  q_ℓ = softmax(s/τ_ℓ),  π_ℓ = softmax(t_ℓ/τ_ℓ)
    D_ℓc = 1 + expm1(β_ℓ) σ_c
    u_ℓc = w_ℓ π_ℓc exp(β_ℓ [c=y]) / D_ℓc,   G = Σ u,   r = u / G

The row is read in three passes, like csrc/common/moekd_math.h:

    1. log-sum-exp of s, s/τ_ℓ and t_ℓ/τ_ℓ                    (σ, q_ℓ, π_ℓ)
    2. sums of u over classes: G, Σu/D, Σu·log D, Σ_c u_ℓc, Σ_c u_ℓc log q_ℓc
    3. the gradient ∂loss/∂s_j (docs/math.md, gradient), in the student's dtype

When the row fits one block, it is loaded once and all three passes run on
registers. Otherwise each pass loops over blocks of BLOCK classes.

The levels live on the first axis of a (LP, BLOCK) tile (LP = L rounded up to
a power of two); padded levels get w = 0, τ = 1, β = 0, so their u is exactly 0.
A log-sum-exp state is (m, z): the running maximum m and z = Σ exp((x − b)/τ)
with the base b = m, or b = 0 while m = −inf (nothing but masked classes so
far), so an all −inf block never forms (−inf) − (−inf).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """x (float32) in dtype, rounded to nearest-even (Triton's interpreter truncates to bf16)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _load_block(s_row, t_row, cols, num_classes, level_ok):
    """s (BLOCK,) and t_ℓ (LP, BLOCK) as float32; classes past C and padded levels read
    as −inf, i.e. as masked classes, so they drop out of every sum."""
    col_ok = cols < num_classes
    s = tl.load(s_row + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + cols[None, :], mask=level_ok[:, None] & col_ok[None, :],
                other=float("-inf")).to(tl.float32)
    return s, t


@triton.jit
def _finite_base(m):
    """The base b of a log-sum-exp state: m, or 0 while m = −inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _level_vector(values, pad, L: tl.constexpr, LP: tl.constexpr):
    """A (LP,) float32 vector from a tuple of L per-level scalars, padded with ``pad``."""
    levels = tl.arange(0, LP)
    out = tl.full([LP], pad, tl.float32)
    for l in tl.static_range(L):
        out = tl.where(levels == l, values[l], out)
    return out


@triton.jit
def _row_constants(tau, inv_tau, beta, exp_beta, expm1_beta, level_weight, grad_scale_ptr,
                   L: tl.constexpr, LP: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The per-level options as (LP,) vectors, and the factor of the stored gradient: "mean"
    folds 1/n_valid into it here, so backward can skip its pass."""
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    else:
        grad_scale = 1.0
    return (_level_vector(tau, 1.0, L, LP), _level_vector(inv_tau, 1.0, L, LP),
            _level_vector(beta, 0.0, L, LP), _level_vector(exp_beta, 1.0, L, LP),
            _level_vector(expm1_beta, 0.0, L, LP), _level_vector(level_weight, 0.0, L, LP), grad_scale)


@triton.jit
def _ignored_row(loss_at, log_likelihood_at, agreement_at, grad_row, num_classes, BLOCK: tl.constexpr,
                 NEED_GRAD: tl.constexpr):
    """Loss, stats and gradient of an ignored row are 0."""
    tl.store(loss_at, 0.0)
    tl.store(log_likelihood_at, 0.0)
    tl.store(agreement_at, 0.0)
    if NEED_GRAD:
        _zero_gradient(grad_row, num_classes, BLOCK)


@triton.jit
def _zero_gradient(grad_row, num_classes, BLOCK: tl.constexpr):
    """0 in the C classes of a gradient row (the buffer is uninitialised)."""
    cols0 = tl.arange(0, BLOCK)
    zeros = tl.zeros([BLOCK], tl.float32).to(grad_row.dtype.element_ty)
    for start in range(0, num_classes, BLOCK):
        cols = start + cols0
        tl.store(grad_row + cols, zeros, mask=cols < num_classes)


@triton.jit
def _student_exp_sums(s, base, inv_tau, HAS_GATE: tl.constexpr):
    """Σ exp(s − b) and, per level, Σ exp((s − b)/τ_ℓ) over one block, for the base b."""
    s_shift = s - base
    z_s = tl.sum(tl.exp(s_shift), axis=0)
    if HAS_GATE:
        z_q = tl.sum(tl.exp(s_shift[None, :] * inv_tau[:, None]), axis=1)
    else:
        z_q = tl.zeros_like(inv_tau)
    return z_s, z_q


@triton.jit
def _student_lse(s, inv_tau, HAS_GATE: tl.constexpr):
    """Pass 1's student side on one block: the states of s (σ) and s/τ_ℓ (q_ℓ); the q_ℓ
    sums share s's maximum, since max(s/τ) = max(s)/τ for τ > 0."""
    m_s = tl.max(s, axis=0)
    z_s, z_q = _student_exp_sums(s, _finite_base(m_s), inv_tau, HAS_GATE)
    return m_s, z_s, z_q


@triton.jit
def _teacher_exp_sums(t, base, shift, inv_tau):
    """Per level, Σ exp((t_ℓ − b_ℓ)/τ_ℓ − shift_ℓ) over one block of t (LP, BLOCK)."""
    return tl.sum(tl.exp((t - base[:, None]) * inv_tau[:, None] - shift[:, None]), axis=1)


@triton.jit
def _block_lse(s, t, inv_tau, HAS_GATE: tl.constexpr):
    """Pass 1 on one block: the log-sum-exp states of s (σ), s/τ_ℓ (q_ℓ) and t_ℓ/τ_ℓ (π_ℓ).

    s (BLOCK,), t (LP, BLOCK), masked entries −inf. The q_ℓ sums share s's maximum,
    since max(s/τ) = max(s)/τ for τ > 0.
    """
    m_s, z_s, z_q = _student_lse(s, inv_tau, HAS_GATE)
    m_t = tl.max(t, axis=1)
    z_t = _teacher_exp_sums(t, _finite_base(m_t), tl.zeros_like(m_t), inv_tau)
    return m_s, z_s, z_q, m_t, z_t


@triton.jit
def _rescale(m_from, m_to, inv_tau):
    """exp((m_from − b(m_to))/τ): moves a sum z from base b(m_from) to base b(m_to).

    An empty state (m_from = −inf, z = 0) gets factor 0, never exp(+large) · 0.
    """
    return tl.exp((m_from - _finite_base(m_to)) * inv_tau)


@triton.jit
def _merge_student(m_s, z_s, z_q, bm_s, bz_s, bz_q, inv_tau, HAS_GATE: tl.constexpr):
    """A block's student states merged into the row's: both move to the new maximum."""
    m_new = tl.maximum(m_s, bm_s)
    z_s = z_s * _rescale(m_s, m_new, 1.0) + bz_s * _rescale(bm_s, m_new, 1.0)
    if HAS_GATE:
        z_q = z_q * _rescale(m_s, m_new, inv_tau) + bz_q * _rescale(bm_s, m_new, inv_tau)
    return m_new, z_s, z_q


@triton.jit
def _merge_teacher(m_t, z_t, bm_t, bz_t, inv_tau):
    """A block's teacher states (per level, in units of t) merged into the row's."""
    mt_new = tl.maximum(m_t, bm_t)
    z_t = z_t * _rescale(m_t, mt_new, inv_tau) + bz_t * _rescale(bm_t, mt_new, inv_tau)
    return mt_new, z_t


@triton.jit
def _block_u(s, t, is_target, log_zs, base_s, log_zq, base_t, log_zt,
             inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE: tl.constexpr):
    """The per-class terms of one block, shared by passes 2 and 3: σ, D, 1/D, u, log q."""
    pi = tl.exp((t - base_t[:, None]) * inv_tau[:, None] - log_zt[:, None])  # π_ℓc
    return _block_u_pi(s, pi, is_target, log_zs, base_s, log_zq, inv_tau, exp_beta, expm1_beta,
                       level_weight, HAS_GATE)


@triton.jit
def _block_u_pi(s, pi, is_target, log_zs, base_s, log_zq, inv_tau, exp_beta, expm1_beta, level_weight,
                HAS_GATE: tl.constexpr):
    """σ, D, 1/D, u, log q of the classes s (BLOCK,), given the gate π (LP, BLOCK) there."""
    # Max-subtracted first: s − (b + log z) would round b + log z at the scale of |s|.
    sigma = tl.exp((s - base_s) - log_zs)                                     # σ_c
    D = 1.0 + expm1_beta[:, None] * sigma[None, :]                            # D_ℓc, no exp(β)·σ − σ
    inv_D = 1.0 / D
    boost = tl.where(is_target[None, :], exp_beta[:, None], 1.0)
    # u_ℓc: masked classes and padded levels have π = 0 or w = 0, hence u = 0.
    u = level_weight[:, None] * pi * boost * inv_D
    if HAS_GATE:
        log_q = (s[None, :] - base_s) * inv_tau[:, None] - log_zq[:, None]  # log q_ℓc
    else:
        log_q = tl.zeros_like(u)
    return sigma, D, inv_D, u, log_q


@triton.jit
def _load_block_u(s_row, t_row, cols, num_classes, level_ok, y, log_zs, base_s, log_zq, base_t, log_zt,
                  inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE: tl.constexpr):
    """Passes 2 and 3 on a block of a long row: load it again, then its per-class terms."""
    s, t = _load_block(s_row, t_row, cols, num_classes, level_ok)
    return _block_u(s, t, cols == y, log_zs, base_s, log_zq, base_t, log_zt,
                    inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)


@triton.jit
def _u_sums(u, D, inv_D, log_q, HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Pass 2 on one block: (G, Σ u/D, Σ u log D) as scalars, (Σ_c u_ℓc, Σ_c u_ℓc log q_ℓc) per level."""
    u_level = tl.sum(u, axis=1)
    G = tl.sum(u_level, axis=0)
    if HAS_EXPERT:
        u_over_D = tl.sum(tl.sum(u * inv_D, axis=1), axis=0)
        # log D rather than log1p(expm1(β)σ): the absolute error is ≤ ulp(1)/2 per
        # class, weighted by r (Σ r = 1), so the loss is off by at most ~6e-8.
        u_log_D = tl.sum(tl.sum(u * tl.log(D), axis=1), axis=0)
    else:
        u_over_D = 0.0
        u_log_D = 0.0
    if HAS_GATE:
        # 0 · log 0 = 0: a class masked in student and teacher adds nothing.
        u_log_q = tl.sum(u * tl.where(u == 0.0, 0.0, log_q), axis=1)
    else:
        u_log_q = tl.zeros_like(u_level)
    return G, u_over_D, u_log_D, u_level, u_log_q


@triton.jit
def _block_grad(sigma, inv_D, u, log_q, is_target, tau, inv_G, A, R, gate_weight, expert_weight,
                HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Pass 3 on one block: ∂loss/∂s_j (docs/math.md, gradient) with r fixed, float32 (BLOCK,)."""
    r = u * inv_G                                                             # r_ℓj
    per_level = tl.zeros_like(r)
    if HAS_EXPERT:
        # σ_j r_ℓj expm1(β)/D_ℓj written as r_ℓj (1 − 1/D_ℓj): bounded, no exp(β)·σ.
        per_level += expert_weight * (r - r * inv_D)
    if HAS_GATE:
        q = tl.exp(log_q)                                                     # q_ℓj
        per_level += gate_weight * tau[:, None] * (R[:, None] * q - r)
    grad = tl.sum(per_level, axis=0)
    if HAS_EXPERT:
        grad += expert_weight * (sigma * A - tl.where(is_target, 1.0, 0.0))
    return grad


@triton.jit
def _target_u(pi_y, log_sigma_y, exp_beta, expm1_beta, level_weight):
    """u_ℓy from π_ℓy and log σ_y, outside the sums over classes."""
    return level_weight * pi_y * exp_beta / (1.0 + expm1_beta * tl.exp(log_sigma_y))


@triton.jit
def _row_outputs(loss_at, log_likelihood_at, agreement_at, in_range, log_sigma_y, pi_y,
                 G, u_over_D, u_log_D, u_level, u_log_q, tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v,
                 gate_weight, expert_weight, HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Stores the row's loss, m and a from pass 2's sums, log σ_y and π_ℓy; returns what
    pass 3 needs: 1/G, A = Σ r/D and R_ℓ = Σ_c r_ℓc. A target out of [0, C) gives NaN."""
    u_y = _target_u(pi_y, log_sigma_y, exp_beta_v, expm1_beta_v, w_v)
    inv_G = tl.where(in_range, 1.0 / G, float("nan"))
    r_y = u_y * inv_G                                                        # r_ℓy
    # Σ_ℓc r log p_ℓc(y) = log σ_y + Σ_ℓ β_ℓ r_ℓy − Σ_ℓc r log D  (Σ r = 1).
    # Why this is not the C++/CUDA loss (moekd::row_loss in csrc/common/moekd_math.h):
    # that regrouped form keeps the target's log D out of the sums and evaluates a log1p
    # per level in float64 once per row, so that every term is one-signed. This textbook
    # form cancels instead when the experts saturate (large β, r_y → 1) and then loses
    # relative precision on a small loss; moving it to the regrouped form is still open
    # (the tests hold it to float32 tolerance with β up to 50).
    expert_ll = log_sigma_y + tl.sum(beta_v * r_y, axis=0) - u_log_D * inv_G
    gate_ce = tl.sum(tau_v * tau_v * u_log_q, axis=0) * inv_G              # Σ_ℓ τ² Σ_c r log q
    # A zero weight drops its term: a masked target (log σ_y = −inf) must not give 0·inf.
    loss = 0.0
    if HAS_EXPERT:
        loss -= expert_weight * expert_ll
    if HAS_GATE:
        loss -= gate_weight * gate_ce
    nan_if_bad = tl.where(in_range, 0.0, float("nan"))
    tl.store(loss_at, loss + nan_if_bad)
    tl.store(log_likelihood_at, log_sigma_y + tl.log(G) + nan_if_bad)  # m
    # a = Σ_ℓ r_ℓy. u_ℓy is recomputed here, outside G's sum, so when the
    # teacher is certain of y rounding can put a an ulp above 1; cap it
    # (a NaN fails the test and stays NaN).
    agreement = tl.sum(u_y, axis=0) / G
    agreement = tl.where(agreement > 1.0, 1.0, agreement)
    tl.store(agreement_at, agreement + nan_if_bad)
    A = u_over_D * inv_G                                                     # Σ r/D
    R = u_level * inv_G                                                      # R_ℓ = Σ_c r_ℓc
    return inv_G, A, R


@triton.jit
def _u_sums_of_blocks(s_row, t_row, num_classes, level_ok, y, log_zs, base_s, log_zq, base_t, log_zt,
                      inv_tau, exp_beta, expm1_beta, level_weight, LP: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Pass 2 over a row of C classes in blocks: _u_sums of the whole row."""
    cols0 = tl.arange(0, BLOCK)
    G = 0.0
    u_over_D = 0.0
    u_log_D = 0.0
    u_level = tl.zeros([LP], tl.float32)
    u_log_q = tl.zeros([LP], tl.float32)
    for start in range(0, num_classes, BLOCK):
        cols = start + cols0
        sigma, D, inv_D, u, log_q = _load_block_u(
            s_row, t_row, cols, num_classes, level_ok, y, log_zs, base_s, log_zq, base_t, log_zt,
            inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)
        bG, bD, blogD, bl, blogq = _u_sums(u, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)
        G += bG
        u_over_D += bD
        u_log_D += blogD
        u_level += bl
        u_log_q += blogq
    return G, u_over_D, u_log_D, u_level, u_log_q


@triton.jit
def _gradient_of_blocks(grad_row, grad_scale, s_row, t_row, num_classes, level_ok, y, log_zs, base_s, log_zq,
                        base_t, log_zt, tau, inv_tau, exp_beta, expm1_beta, level_weight, inv_G, A, R,
                        gate_weight, expert_weight, BLOCK: tl.constexpr, HAS_EXPERT: tl.constexpr,
                        HAS_GATE: tl.constexpr):
    """Pass 3 over a row of C classes in blocks: grad_scale · ∂loss/∂s stored in the
    gradient's dtype."""
    cols0 = tl.arange(0, BLOCK)
    for start in range(0, num_classes, BLOCK):
        cols = start + cols0
        sigma, D, inv_D, u, log_q = _load_block_u(
            s_row, t_row, cols, num_classes, level_ok, y, log_zs, base_s, log_zq, base_t, log_zt,
            inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)
        grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, cols == y, tau, inv_G, A, R,
                                        gate_weight, expert_weight, HAS_EXPERT, HAS_GATE)
        tl.store(grad_row + cols, _round_to(grad, grad_row.dtype.element_ty), mask=cols < num_classes)


@triton.jit
def moe_kd_row_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_level_stride, teacher_row_stride,
    target_ptr,
    loss_ptr, log_likelihood_ptr, agreement_ptr,
    grad_ptr, grad_row_stride,
    grad_scale_ptr,                                           # the gradient's factor (device scalar)
    num_classes, ignore_index,
    tau, inv_tau, beta, exp_beta, expm1_beta, level_weight,  # tuples of L floats
    gate_weight, expert_weight,                               # λ_g, λ_e
    L: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    NEED_GRAD: tl.constexpr,                     # False: no pass 3, grad_ptr is never touched
):
    levels = tl.arange(0, LP)
    level_ok = levels < L
    level_offsets = levels.to(tl.int64)[:, None] * teacher_level_stride
    cols0 = tl.arange(0, BLOCK)
    tau_v, inv_tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v, grad_scale = _row_constants(
        tau, inv_tau, beta, exp_beta, expm1_beta, level_weight, grad_scale_ptr, L, LP, HAS_GRAD_SCALE)

    # One row per program. An int64 row index: N·C can pass 2^31 elements.
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    t_row = teacher_ptr + row * teacher_row_stride + level_offsets

    y = tl.load(target_ptr + row).to(tl.int64)
    if y == ignore_index:
        _ignored_row(loss_ptr + row, log_likelihood_ptr + row, agreement_ptr + row, grad_row, num_classes,
                     BLOCK, NEED_GRAD)
    else:
        # ---- pass 1: log-sum-exp states of s, s/τ_ℓ, t_ℓ/τ_ℓ ----
        if SINGLE_BLOCK:
            s, t = _load_block(s_row, t_row, cols0, num_classes, level_ok)
            m_s, z_s, z_q, m_t, z_t = _block_lse(s, t, inv_tau_v, HAS_GATE)
        else:
            m_s = float("-inf")
            z_s = 0.0
            z_q = tl.zeros([LP], tl.float32)
            m_t = tl.full([LP], float("-inf"), tl.float32)
            z_t = tl.zeros([LP], tl.float32)
            for start in range(0, num_classes, BLOCK):
                cols = start + cols0
                s, t = _load_block(s_row, t_row, cols, num_classes, level_ok)
                bm_s, bz_s, bz_q, bm_t, bz_t = _block_lse(s, t, inv_tau_v, HAS_GATE)
                m_s, z_s, z_q = _merge_student(m_s, z_s, z_q, bm_s, bz_s, bz_q, inv_tau_v, HAS_GATE)
                m_t, z_t = _merge_teacher(m_t, z_t, bm_t, bz_t, inv_tau_v)
        base_s = _finite_base(m_s)
        log_zs = tl.log(z_s)                               # LSE(s) = base_s + log_zs
        if HAS_GATE:
            log_zq = tl.log(z_q)                           # log q_ℓc = (s_c − b_s)/τ_ℓ − log_zq_ℓ
        else:
            log_zq = tl.zeros([LP], tl.float32)            # q is not needed
        base_t = _finite_base(m_t)
        log_zt = tl.log(tl.where(level_ok, z_t, 1.0))      # π_ℓc = exp((t_ℓc − b_t)/τ_ℓ − log_zt_ℓ)

        # ---- pass 2: u-sums ----
        if SINGLE_BLOCK:
            # The row is in registers: these terms serve pass 3 as well.
            sigma, D, inv_D, u, log_q = _block_u(
                s, t, cols0 == y, log_zs, base_s, log_zq, base_t, log_zt,
                inv_tau_v, exp_beta_v, expm1_beta_v, w_v, HAS_GATE)
            G, u_over_D, u_log_D, u_level, u_log_q = _u_sums(u, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)
        else:
            G, u_over_D, u_log_D, u_level, u_log_q = _u_sums_of_blocks(
                s_row, t_row, num_classes, level_ok, y, log_zs, base_s, log_zq, base_t, log_zt,
                inv_tau_v, exp_beta_v, expm1_beta_v, w_v, LP, BLOCK, HAS_EXPERT, HAS_GATE)

        # ---- loss and stats ----
        # An out-of-range target is never loaded: its row becomes NaN through 1/G.
        in_range = (y >= 0) & (y < num_classes)
        y_safe = tl.where(in_range, y, 0)
        log_sigma_y = (tl.load(s_row + y_safe).to(tl.float32) - base_s) - log_zs           # log σ_y
        t_y = tl.load(t_row + y_safe, mask=level_ok[:, None], other=float("-inf")).to(tl.float32)
        t_y = tl.sum(t_y, axis=1)                                                # (LP,): t_ℓy
        pi_y = tl.exp((t_y - base_t) * inv_tau_v - log_zt)
        inv_G, A, R = _row_outputs(loss_ptr + row, log_likelihood_ptr + row, agreement_ptr + row,
                                   in_range, log_sigma_y, pi_y, G, u_over_D, u_log_D, u_level, u_log_q,
                                   tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v, gate_weight, expert_weight,
                                   HAS_EXPERT, HAS_GATE)

        # ---- pass 3: the gradient ----
        if NEED_GRAD:
            if SINGLE_BLOCK:
                grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, cols0 == y, tau_v, inv_G, A, R,
                                                gate_weight, expert_weight, HAS_EXPERT, HAS_GATE)
                tl.store(grad_row + cols0, _round_to(grad, grad_ptr.dtype.element_ty), mask=cols0 < num_classes)
            else:
                _gradient_of_blocks(grad_row, grad_scale, s_row, t_row, num_classes, level_ok, y, log_zs, base_s,
                                    log_zq, base_t, log_zt, tau_v, inv_tau_v, exp_beta_v, expm1_beta_v, w_v,
                                    inv_G, A, R, gate_weight, expert_weight, BLOCK, HAS_EXPERT, HAS_GATE)


# ---- a top-k teacher (docs/math.md, "Extensions"; teachers.TopKRows) ----
#
# The teacher row at level ℓ is one logit ρ_ℓ ("rest") at every class but K listed ones.
# No teacher row is ever built; each pass reads the student densely and the teacher as
# K values plus a scalar:
#
#   1. σ and q_ℓ from s as above; π_ℓ's normaliser from the K values and (C − K′_ℓ)
#      copies of exp(ρ_ℓ/τ_ℓ): a loop over K, not over C.
#   2. the u-sums as if every class were unlisted (u with the per-level constant π_ρ,
#      no teacher load), then per listed entry the sums' difference between its own π
#      and π_ρ (s gathered at the K indices). The dense loop is skipped when π_ρ = 0 at
#      every level (kind "logits": ρ = −inf), where it would add zeros.
#   3. the gradient as if every class were unlisted, stored; then, after a barrier, the
#      gradient of each listed class recomputed in full and stored over it.
#
# Why this shape: a dense tile of the teacher would cost a scatter of K values into each
# block (or a K-wide comparison per class), while the scalar ρ_ℓ keeps the dense loops
# as cheap as the student's own and moves no teacher bytes, so at the memory bound the
# kernel reads s (twice or three times, like the dense kernel) and writes the gradient,
# plus K entries per row. Overwriting the listed classes' gradient with its full value,
# instead of adding a correction to the stored one, keeps one rounding to the gradient's
# dtype (a bf16 read-modify-write would round twice, and the correction can cancel most
# of the stored value). A class listed at several levels needs every level's entry for
# it: with the same indices at every level (L = 1, or one head at L temperatures, level
# stride 0) those are the entries at the same k; otherwise (SEARCH) each level's K
# indices are searched, a (LP·KB, KB) comparison per pair of blocks: O(L²K²) per row,
# small for the K of stored top-k teachers (tens to hundreds) but not for K near C.


@triton.jit
def _load_s(s_row, cols, num_classes):
    """Student logits at ``cols`` as float32, −inf past C (a masked class)."""
    return tl.load(s_row + cols, mask=cols < num_classes, other=float("-inf")).to(tl.float32)


@triton.jit
def _u_sums_split(u, D, inv_D, log_q, HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """_u_sums for terms that may be differences (u_listed − u_ρ): Σ_c u log q without its
    −inf terms, which a difference could turn into inf − inf; _inf_terms counts those."""
    u_level = tl.sum(u, axis=1)
    G = tl.sum(u_level, axis=0)
    if HAS_EXPERT:
        u_over_D = tl.sum(tl.sum(u * inv_D, axis=1), axis=0)
        u_log_D = tl.sum(tl.sum(u * tl.log(D), axis=1), axis=0)
    else:
        u_over_D = 0.0
        u_log_D = 0.0
    if HAS_GATE:
        u_log_q = tl.sum(u * tl.where(log_q == float("-inf"), 0.0, log_q), axis=1)
    else:
        u_log_q = tl.zeros_like(u_level)
    return G, u_over_D, u_log_D, u_level, u_log_q


@triton.jit
def _inf_terms(u, log_q, HAS_GATE: tl.constexpr):
    """Per level, the number of classes where u > 0 meets log q = −inf (a class the student
    masks and the gate weighs): each makes Σ_c u_ℓc log q_ℓc −inf."""
    if HAS_GATE:
        n = tl.sum(tl.where((u > 0.0) & (log_q == float("-inf")), 1.0, 0.0), axis=1)
    else:
        n = tl.sum(tl.zeros_like(u), axis=1)
    return n


@triton.jit
def _top_k_entries(value_rows, index_rows, value_k_stride, index_k_stride, ks, num_entries, level_ok,
                   class_offset, num_classes):
    """Entries ``ks`` (KB,) of every level: their logits (LP, KB) as float32, their classes
    relative to ``class_offset``, and which are listed among the C classes from there on.
    Padding (−inf) and entries of classes outside them are not listed and read −inf; a NaN
    is data: listed, and it propagates."""
    entry_ok = level_ok[:, None] & (ks < num_entries)[None, :]
    v = tl.load(value_rows + ks[None, :] * value_k_stride, mask=entry_ok, other=float("-inf")).to(tl.float32)
    c = tl.load(index_rows + ks[None, :] * index_k_stride, mask=entry_ok, other=-1) - class_offset
    listed = (v != float("-inf")) & (c >= 0) & (c < num_classes)
    return tl.where(listed, v, float("-inf")), c, listed


@triton.jit
def _top_k_teacher_lse(value_rows, index_rows, value_k_stride, index_k_stride, rest_at, num_entries,
                       class_offset, num_classes, y, level_ok, inv_tau, LP: tl.constexpr, KB: tl.constexpr):
    """Pass 1's teacher side: the state (m_t, z_t) of t_ℓ/τ_ℓ over the C classes from
    ``class_offset`` on, from their listed entries and C − K′_ℓ copies of the unlisted
    classes' logit ρ_ℓ (a loop over K, not over C); ρ_ℓ (−inf where every class is listed);
    and t_ℓy, the listed value where level ℓ lists y (a sum, so a NaN stays NaN), else ρ_ℓ
    (y relative to class_offset)."""
    ks0 = tl.arange(0, KB)
    m_t = tl.full([LP], float("-inf"), tl.float32)
    z_t = tl.zeros([LP], tl.float32)
    num_listed = tl.zeros([LP], tl.float32)
    t_y_listed = tl.zeros([LP], tl.float32)
    y_listed = tl.zeros([LP], tl.float32)
    for k0 in range(0, num_entries, KB):
        v, c, listed = _top_k_entries(value_rows, index_rows, value_k_stride, index_k_stride, k0 + ks0,
                                      num_entries, level_ok, class_offset, num_classes)
        bm_t = tl.max(v, axis=1)
        m_t, z_t = _merge_teacher(m_t, z_t, bm_t, _teacher_exp_sums(v, _finite_base(bm_t), tl.zeros_like(bm_t),
                                                                     inv_tau), inv_tau)
        num_listed += tl.sum(tl.where(listed, 1.0, 0.0), axis=1)
        at_y = listed & (c == y)
        t_y_listed += tl.sum(tl.where(at_y, v, 0.0), axis=1)
        y_listed += tl.sum(tl.where(at_y, 1.0, 0.0), axis=1)
    rest = tl.load(rest_at, mask=level_ok, other=float("-inf")).to(tl.float32)
    num_rest = num_classes - num_listed                               # C − K′_ℓ unlisted classes
    rest = tl.where(num_rest > 0, rest, float("-inf"))
    m_t, z_t = _merge_teacher(m_t, z_t, rest, num_rest, inv_tau)
    return m_t, z_t, rest, tl.where(y_listed > 0.0, t_y_listed, rest)


@triton.jit
def _unlisted_block_u(s_row, s, cols, num_classes, y, pi_rest, log_zs, base_s, log_zq, inv_tau, exp_beta,
                      expm1_beta, level_weight, SINGLE_BLOCK: tl.constexpr, HAS_GATE: tl.constexpr):
    """_block_u_pi for the block ``cols`` of a top-k row as if no class were listed: every
    class has the gate π_ρ of the unlisted ones. ``s``: the row's one block when SINGLE_BLOCK."""
    if SINGLE_BLOCK:
        s_block = s
    else:
        s_block = _load_s(s_row, cols, num_classes)
    # Classes past C get π = 0 (an unlisted class has π_ρ, a missing one nothing).
    pi = tl.where((cols < num_classes)[None, :], pi_rest[:, None], 0.0)
    return _block_u_pi(s_block, pi, cols == y, log_zs, base_s, log_zq, inv_tau, exp_beta, expm1_beta,
                       level_weight, HAS_GATE)


@triton.jit
def _top_k_u_sums(s_row, s, num_classes, y, value_rows, index_rows, value_k_stride, index_k_stride, num_entries,
                  class_offset, level_ok, pi_rest, log_zs, base_s, log_zq, base_t, log_zt,
                  inv_tau, exp_beta, expm1_beta, level_weight, LP: tl.constexpr, BLOCK: tl.constexpr,
                  KB: tl.constexpr, SINGLE_BLOCK: tl.constexpr, HAS_EXPERT: tl.constexpr,
                  HAS_GATE: tl.constexpr):
    """Pass 2 with a top-k teacher: the u-sums as if no class were listed, then per listed
    entry. ``s``: the row's one block when SINGLE_BLOCK (else unused); y and the classes
    relative to ``class_offset``."""
    cols0 = tl.arange(0, BLOCK)
    ks0 = tl.arange(0, KB)
    G = 0.0
    u_over_D = 0.0
    u_log_D = 0.0
    u_level = tl.zeros([LP], tl.float32)
    u_log_q = tl.zeros([LP], tl.float32)
    inf_terms = tl.zeros([LP], tl.float32)
    # π_ρ = 0 at every level (kind "logits"): the dense loop would add zeros; skip it.
    # (A NaN π_ρ is not 0: it runs and propagates.)
    dense_end = tl.where(tl.sum(tl.where(pi_rest != 0.0, 1, 0), axis=0) > 0, num_classes, 0)
    for start in range(0, dense_end, BLOCK):
        sigma, D, inv_D, u, log_q = _unlisted_block_u(s_row, s, start + cols0, num_classes, y, pi_rest, log_zs,
                                                      base_s, log_zq, inv_tau, exp_beta, expm1_beta,
                                                      level_weight, SINGLE_BLOCK, HAS_GATE)
        bG, bD, blogD, bl, blogq = _u_sums_split(u, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)
        G += bG
        u_over_D += bD
        u_log_D += blogD
        u_level += bl
        u_log_q += blogq
        inf_terms += _inf_terms(u, log_q, HAS_GATE)
    for k0 in range(0, num_entries, KB):
        # Entry (ℓ, k) is class c_ℓk of level ℓ: the classes differ between levels.
        v, c, listed = _top_k_entries(value_rows, index_rows, value_k_stride, index_k_stride, k0 + ks0,
                                      num_entries, level_ok, class_offset, num_classes)
        s_c = tl.load(s_row + c, mask=listed, other=0.0).to(tl.float32)
        sigma_c = tl.exp((s_c - base_s) - log_zs)
        D = 1.0 + expm1_beta[:, None] * sigma_c
        inv_D = 1.0 / D
        boost = tl.where(c == y, exp_beta[:, None], 1.0)
        pi_c = tl.exp((v - base_t[:, None]) * inv_tau[:, None] - log_zt[:, None])
        # u_ρ as _block_u_pi forms it: the difference takes back what the dense loop added.
        u_c = tl.where(listed, level_weight[:, None] * pi_c * boost * inv_D, 0.0)
        u_r = tl.where(listed, level_weight[:, None] * pi_rest[:, None] * boost * inv_D, 0.0)
        if HAS_GATE:
            log_q = (s_c - base_s) * inv_tau[:, None] - log_zq[:, None]
        else:
            log_q = tl.zeros_like(u_c)
        bG, bD, blogD, bl, blogq = _u_sums_split(u_c - u_r, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)
        G += bG
        u_over_D += bD
        u_log_D += blogD
        u_level += bl
        u_log_q += blogq
        inf_terms += _inf_terms(u_c, log_q, HAS_GATE) - _inf_terms(u_r, log_q, HAS_GATE)
    # 0 · log 0 = 0 as in _u_sums; NaN + (−inf) stays NaN.
    u_log_q += tl.where(inf_terms > 0.0, float("-inf"), 0.0)
    return G, u_over_D, u_log_D, u_level, u_log_q


@triton.jit
def _top_k_gradient(grad_row, grad_scale, s_row, s, num_classes, y, value_row, value_level_stride, value_k_stride,
                    index_row, index_level_stride, index_k_stride, num_entries, class_offset, level_ok, rest,
                    pi_rest, log_zs, base_s, log_zq, base_t, log_zt, tau, inv_tau, exp_beta, expm1_beta,
                    level_weight, inv_G, A, R, gate_weight, expert_weight, L: tl.constexpr, LP: tl.constexpr,
                    BLOCK: tl.constexpr, KB: tl.constexpr, QB: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                    SEARCH: tl.constexpr, HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Pass 3 with a top-k teacher: the gradient as if no class were listed, then the listed
    classes' (``value_row``/``index_row``: the row's entries of level 0; y and the classes
    relative to ``class_offset``)."""
    levels = tl.arange(0, LP)
    levels64 = levels.to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    ks0 = tl.arange(0, KB)
    value_rows = value_row + levels64[:, None] * value_level_stride
    for start in range(0, num_classes, BLOCK):
        cols = start + cols0
        sigma, D, inv_D, u, log_q = _unlisted_block_u(s_row, s, cols, num_classes, y, pi_rest, log_zs, base_s,
                                                      log_zq, inv_tau, exp_beta, expm1_beta, level_weight,
                                                      SINGLE_BLOCK, HAS_GATE)
        grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, cols == y, tau, inv_G, A, R,
                                        gate_weight, expert_weight, HAS_EXPERT, HAS_GATE)
        tl.store(grad_row + cols, _round_to(grad, grad_row.dtype.element_ty), mask=cols < num_classes)
    # The listed classes' stores below replace stores above, made by other threads.
    tl.debug_barrier()
    q0 = tl.arange(0, QB)
    for k0 in range(0, num_entries, KB):
        # One listed class per lane: t (LP, QB) is its teacher logit at every level.
        if SEARCH:
            # Lane f is entry k0 + f % KB of level f // KB.
            q_level = (q0 // KB).to(tl.int64)
            q_k = k0 + q0 % KB
            q_ok = (q_level < L) & (q_k < num_entries)
            q_v = tl.load(value_row + q_level * value_level_stride + q_k * value_k_stride, mask=q_ok,
                          other=float("-inf")).to(tl.float32)
            q_class = tl.load(index_row + q_level * index_level_stride + q_k * index_k_stride, mask=q_ok,
                              other=-1) - class_offset
            q_listed = (q_v != float("-inf")) & (q_class >= 0) & (q_class < num_classes)
            t = tl.zeros([LP, QB], tl.float32) + rest[:, None]
            for level in tl.static_range(L):
                found = tl.zeros([QB], tl.float32)
                found_v = tl.zeros([QB], tl.float32)
                for j0 in range(0, num_entries, KB):
                    js = j0 + ks0
                    j_ok = js < num_entries
                    v2 = tl.load(value_row + level * value_level_stride + js * value_k_stride, mask=j_ok,
                                 other=float("-inf")).to(tl.float32)
                    c2 = tl.load(index_row + level * index_level_stride + js * index_k_stride, mask=j_ok,
                                 other=-1) - class_offset
                    match = (q_class[:, None] == c2[None, :]) & (v2 != float("-inf"))[None, :]
                    found += tl.sum(tl.where(match, 1.0, 0.0), axis=1)
                    found_v += tl.sum(tl.where(match, v2[None, :], 0.0), axis=1)
                t = tl.where((levels == level)[:, None] & (found > 0.0)[None, :], found_v[None, :], t)
        else:
            # Entry k lists the same class at every level (level 0's index names it).
            q_k = k0 + q0
            entry_ok = level_ok[:, None] & (q_k < num_entries)[None, :]
            v = tl.load(value_rows + q_k[None, :] * value_k_stride, mask=entry_ok,
                        other=float("-inf")).to(tl.float32)
            q_class = tl.load(index_row + q_k * index_k_stride, mask=q_k < num_entries, other=-1) - class_offset
            listed = v != float("-inf")
            q_listed = (tl.sum(tl.where(listed, 1, 0), axis=0) > 0) & (q_class >= 0) & (q_class < num_classes)
            t = tl.where(listed, v, rest[:, None])
        s_q = tl.load(s_row + q_class, mask=q_listed, other=0.0).to(tl.float32)
        pi = tl.exp((t - base_t[:, None]) * inv_tau[:, None] - log_zt[:, None])
        sigma, D, inv_D, u, log_q = _block_u_pi(s_q, pi, q_class == y, log_zs, base_s, log_zq,
                                                inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)
        grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, q_class == y, tau, inv_G, A, R,
                                        gate_weight, expert_weight, HAS_EXPERT, HAS_GATE)
        # With SEARCH a class listed at several levels has several lanes: same value.
        tl.store(grad_row + q_class, _round_to(grad, grad_row.dtype.element_ty), mask=q_listed)


@triton.jit
def moe_kd_topk_row_kernel(
    student_ptr, student_row_stride,
    index_ptr, index_level_stride, index_row_stride, index_k_stride,      # (L, N, K) classes
    value_ptr, value_level_stride, value_row_stride, value_k_stride,      # (L, N, K) logits, −inf: padding
    rest_ptr, rest_level_stride, rest_row_stride,                         # (L, N) the unlisted classes' logit
    target_ptr,
    loss_ptr, log_likelihood_ptr, agreement_ptr,
    grad_ptr, grad_row_stride,
    grad_scale_ptr,
    num_classes, num_entries, ignore_index,                               # C, K
    tau, inv_tau, beta, exp_beta, expm1_beta, level_weight,
    gate_weight, expert_weight,
    L: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    KB: tl.constexpr,            # entries per step of the loops over K
    SEARCH: tl.constexpr,        # levels list different classes: pass 3 searches them
    QB: tl.constexpr,            # listed classes per step of pass 3's fix-up: KB, or LP·KB with SEARCH
    HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    levels = tl.arange(0, LP)
    level_ok = levels < L
    levels64 = levels.to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    tau_v, inv_tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v, grad_scale = _row_constants(
        tau, inv_tau, beta, exp_beta, expm1_beta, level_weight, grad_scale_ptr, L, LP, HAS_GRAD_SCALE)

    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    index_row = index_ptr + row * index_row_stride
    value_row = value_ptr + row * value_row_stride
    index_rows = index_row + levels64[:, None] * index_level_stride   # (LP, 1)
    value_rows = value_row + levels64[:, None] * value_level_stride

    y = tl.load(target_ptr + row).to(tl.int64)
    if y == ignore_index:
        _ignored_row(loss_ptr + row, log_likelihood_ptr + row, agreement_ptr + row, grad_row, num_classes,
                     BLOCK, NEED_GRAD)
    else:
        # ---- pass 1, student: log-sum-exp states of s and s/τ_ℓ ----
        if SINGLE_BLOCK:
            s = _load_s(s_row, cols0, num_classes)
            m_s, z_s, z_q = _student_lse(s, inv_tau_v, HAS_GATE)
        else:
            s = tl.zeros([BLOCK], tl.float32)  # unused: each pass loads its blocks
            m_s = float("-inf")
            z_s = 0.0
            z_q = tl.zeros([LP], tl.float32)
            for start in range(0, num_classes, BLOCK):
                bm_s, bz_s, bz_q = _student_lse(_load_s(s_row, start + cols0, num_classes), inv_tau_v,
                                                HAS_GATE)
                m_s, z_s, z_q = _merge_student(m_s, z_s, z_q, bm_s, bz_s, bz_q, inv_tau_v, HAS_GATE)
        base_s = _finite_base(m_s)
        log_zs = tl.log(z_s)
        if HAS_GATE:
            log_zq = tl.log(z_q)
        else:
            log_zq = tl.zeros([LP], tl.float32)

        # ---- pass 1, teacher: t_ℓ/τ_ℓ's state from the K entries, then the rest ----
        m_t, z_t, rest, t_y = _top_k_teacher_lse(
            value_rows, index_rows, value_k_stride, index_k_stride,
            rest_ptr + row * rest_row_stride + levels64 * rest_level_stride, num_entries, 0, num_classes, y,
            level_ok, inv_tau_v, LP, KB)
        base_t = _finite_base(m_t)
        log_zt = tl.log(tl.where(level_ok, z_t, 1.0))
        pi_rest = tl.exp((rest - base_t) * inv_tau_v - log_zt)           # π_ℓ at an unlisted class

        # ---- pass 2: u-sums as if no class were listed, then per listed entry ----
        G, u_over_D, u_log_D, u_level, u_log_q = _top_k_u_sums(
            s_row, s, num_classes, y, value_rows, index_rows, value_k_stride, index_k_stride, num_entries, 0,
            level_ok, pi_rest, log_zs, base_s, log_zq, base_t, log_zt, inv_tau_v, exp_beta_v, expm1_beta_v, w_v,
            LP, BLOCK, KB, SINGLE_BLOCK, HAS_EXPERT, HAS_GATE)

        # ---- loss and stats ----
        in_range = (y >= 0) & (y < num_classes)
        y_safe = tl.where(in_range, y, 0)
        log_sigma_y = (tl.load(s_row + y_safe).to(tl.float32) - base_s) - log_zs
        pi_y = tl.exp((t_y - base_t) * inv_tau_v - log_zt)
        inv_G, A, R = _row_outputs(loss_ptr + row, log_likelihood_ptr + row, agreement_ptr + row,
                                   in_range, log_sigma_y, pi_y, G, u_over_D, u_log_D, u_level, u_log_q,
                                   tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v, gate_weight, expert_weight,
                                   HAS_EXPERT, HAS_GATE)

        # ---- pass 3: the gradient as if no class were listed, then the listed classes ----
        if NEED_GRAD:
            _top_k_gradient(grad_row, grad_scale, s_row, s, num_classes, y, value_row, value_level_stride,
                            value_k_stride, index_row, index_level_stride, index_k_stride, num_entries, 0,
                            level_ok, rest, pi_rest, log_zs, base_s, log_zq, base_t, log_zt, tau_v, inv_tau_v,
                            exp_beta_v, expm1_beta_v, w_v, inv_G, A, R, gate_weight, expert_weight,
                            L, LP, BLOCK, KB, QB, SINGLE_BLOCK, SEARCH, HAS_EXPERT, HAS_GATE)


# ---- the phases over a class slice (phases.py; vocab-parallel training) ----
#
# Each row holds the classes [class_offset, class_offset + C) of a longer row: the sums over
# classes are split where the caller combines the slices (phases.py, the row layouts):
#
#   0. maxima of s and t_ℓ/τ_ℓ                                          (combined by max)
#   1. given the global maxima M: Σ exp(s − M_s), Σ exp((s − M_s)/τ_ℓ), Σ exp(t_ℓ/τ_ℓ − M_ℓ)
#   2. given the global normalisers: pass 2's u-sums, log σ_y and u_ℓy     (combined by sum)
#   3. given 1/G, A and R_ℓ as well: pass 3, the slice's gradient
#
# with the fused kernels' passes: σ = exp((s − b_s) − log_zs) with b_s = M_s and log_zs =
# lse_s − M_s, log q_ℓ = (s − M_s)/τ_ℓ − log_z_q, π_ℓ = exp(t_ℓ/τ_ℓ − lse_t) (base 0). The
# top-k teacher is read as in its fused kernel, its listed entries outside the slice ignored.


@triton.jit
def _load_levels(row_in_ptr, first, num_rows, row, levels64, level_ok):
    """Rows first, …, first + L − 1 of a (rows, N) float32 table at column ``row``, as (LP,)
    with 0 at the padded levels."""
    return tl.load(row_in_ptr + (first + levels64) * num_rows + row, mask=level_ok, other=0.0)


@triton.jit
def _store_levels(row_out_ptr, first, num_rows, row, values, levels64, level_ok):
    tl.store(row_out_ptr + (first + levels64) * num_rows + row, values, mask=level_ok)


@triton.jit
def moe_kd_phase_kernel(
    student_ptr, student_row_stride,                                      # (N, C) this slice's classes
    teacher_ptr, teacher_level_stride, teacher_row_stride,                # not TOP_K: (L, N, C) logits
    index_ptr, index_level_stride, index_row_stride, index_k_stride,      # TOP_K: (L, N, K) global classes
    value_ptr, value_level_stride, value_row_stride, value_k_stride,      # (L, N, K) logits, −inf: padding
    rest_ptr, rest_level_stride, rest_row_stride,                         # (L, N) the unlisted classes' logit
    target_ptr,                                                           # (N,) global classes
    row_in_ptr, row_out_ptr,                   # (rows, N) float32 tables: the phase's inputs and outputs
    grad_ptr, grad_row_stride, grad_scale_ptr,                            # phase 3: (N, C) in the student's dtype
    num_rows, num_classes, class_offset, num_entries, ignore_index,       # N, C, the slice's first class, K
    tau, inv_tau, beta, exp_beta, expm1_beta, level_weight,
    gate_weight, expert_weight,
    PHASE: tl.constexpr, TOP_K: tl.constexpr,
    L: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, SEARCH: tl.constexpr,
    QB: tl.constexpr, HAS_EXPERT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
):
    levels = tl.arange(0, LP)
    level_ok = levels < L
    levels64 = levels.to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    tau_v, inv_tau_v, beta_v, exp_beta_v, expm1_beta_v, w_v, grad_scale = _row_constants(
        tau, inv_tau, beta, exp_beta, expm1_beta, level_weight, grad_scale_ptr, L, LP, HAS_GRAD_SCALE)

    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_row_stride
    if TOP_K:
        index_row = index_ptr + row * index_row_stride
        value_row = value_ptr + row * value_row_stride
        index_rows = index_row + levels64[:, None] * index_level_stride   # (LP, 1)
        value_rows = value_row + levels64[:, None] * value_level_stride
        rest_at = rest_ptr + row * rest_row_stride + levels64 * rest_level_stride
    else:
        t_row = teacher_ptr + row * teacher_row_stride + levels64[:, None] * teacher_level_stride

    if PHASE == 0:
        m_s = float("-inf")
        m_t = tl.full([LP], float("-inf"), tl.float32)
        for start in range(0, num_classes, BLOCK):
            cols = start + cols0
            if TOP_K:
                s = _load_s(s_row, cols, num_classes)
            else:
                s, t = _load_block(s_row, t_row, cols, num_classes, level_ok)
                m_t = tl.maximum(m_t, tl.max(t, axis=1))
            m_s = tl.maximum(m_s, tl.max(s, axis=0))
        if TOP_K:
            m_t, z_t, rest, t_y = _top_k_teacher_lse(value_rows, index_rows, value_k_stride, index_k_stride,
                                                     rest_at, num_entries, class_offset, num_classes, -1,
                                                     level_ok, inv_tau_v, LP, KB)
        tl.store(row_out_ptr + row, m_s)
        # max(t)/τ is max(t/τ): rounding is monotonic.
        _store_levels(row_out_ptr, 1, num_rows, row, m_t * inv_tau_v, levels64, level_ok)
    elif PHASE == 1:
        # The global maxima; −inf (every class masked) gives sums of 0 rather than NaN.
        base_s = _finite_base(tl.load(row_in_ptr + row))
        max_t = _finite_base(_load_levels(row_in_ptr, 1, num_rows, row, levels64, level_ok))  # of t_ℓ/τ_ℓ
        z_s = 0.0
        z_q = tl.zeros([LP], tl.float32)
        z_t = tl.zeros([LP], tl.float32)
        for start in range(0, num_classes, BLOCK):
            cols = start + cols0
            if TOP_K:
                s = _load_s(s_row, cols, num_classes)
            else:
                s, t = _load_block(s_row, t_row, cols, num_classes, level_ok)
                z_t += _teacher_exp_sums(t, tl.zeros_like(max_t), max_t, inv_tau_v)
            bz_s, bz_q = _student_exp_sums(s, base_s, inv_tau_v, True)
            z_s += bz_s
            z_q += bz_q
        if TOP_K:
            # The slice's own state, moved from its maximum to the global one.
            m_t, z_t, rest, t_y = _top_k_teacher_lse(value_rows, index_rows, value_k_stride, index_k_stride,
                                                     rest_at, num_entries, class_offset, num_classes, -1,
                                                     level_ok, inv_tau_v, LP, KB)
            z_t = z_t * tl.exp(m_t * inv_tau_v - max_t)
        tl.store(row_out_ptr + row, z_s)
        _store_levels(row_out_ptr, 1, num_rows, row, z_q, levels64, level_ok)
        _store_levels(row_out_ptr, 1 + L, num_rows, row, z_t, levels64, level_ok)
    else:
        grad_row = grad_ptr + row * grad_row_stride
        y = tl.load(target_ptr + row).to(tl.int64)
        if y == ignore_index:  # finalize gives such rows 0 whatever their sums
            if PHASE == 2:
                tl.store(row_out_ptr + row, 0.0)
                tl.store(row_out_ptr + num_rows + row, 0.0)
                tl.store(row_out_ptr + 2 * num_rows + row, 0.0)
                for first in tl.static_range(3, 3 + 3 * L, L):
                    _store_levels(row_out_ptr, first, num_rows, row, tl.zeros([LP], tl.float32), levels64, level_ok)
            else:
                _zero_gradient(grad_row, num_classes, BLOCK)
        else:
            # y in this slice, or −1: no class of the slice is the target.
            owns_y = (y - class_offset >= 0) & (y - class_offset < num_classes)
            y_here = tl.where(owns_y, y - class_offset, -1)
            y_safe = tl.where(owns_y, y_here, 0)  # a class of the slice to read where it does not matter
            max_s = tl.load(row_in_ptr + row)
            base_s = _finite_base(max_s)
            log_zs = tl.load(row_in_ptr + num_rows + row) - base_s
            log_zq = _load_levels(row_in_ptr, 2, num_rows, row, levels64, level_ok)
            log_zt = _load_levels(row_in_ptr, 2 + L, num_rows, row, levels64, level_ok)
            base_t = tl.zeros([LP], tl.float32)
            if TOP_K:
                m_t, z_t, rest, t_y = _top_k_teacher_lse(value_rows, index_rows, value_k_stride, index_k_stride,
                                                         rest_at, num_entries, class_offset, num_classes, y_here,
                                                         level_ok, inv_tau_v, LP, KB)
                pi_rest = tl.exp((rest - base_t) * inv_tau_v - log_zt)
            if PHASE == 2:
                # Every sum, whatever the weights: the rows are the contract's.
                if TOP_K:
                    G, u_over_D, u_log_D, u_level, u_log_q = _top_k_u_sums(
                        s_row, cols0.to(tl.float32), num_classes, y_here, value_rows, index_rows, value_k_stride,
                        index_k_stride, num_entries, class_offset, level_ok, pi_rest, log_zs, base_s, log_zq,
                        base_t, log_zt, inv_tau_v, exp_beta_v, expm1_beta_v, w_v, LP, BLOCK, KB, False, True, True)
                else:
                    G, u_over_D, u_log_D, u_level, u_log_q = _u_sums_of_blocks(
                        s_row, t_row, num_classes, level_ok, y_here, log_zs, base_s, log_zq, base_t, log_zt,
                        inv_tau_v, exp_beta_v, expm1_beta_v, w_v, LP, BLOCK, True, True)
                    t_y = tl.load(t_row + y_safe, mask=level_ok[:, None], other=float("-inf")).to(tl.float32)
                    t_y = tl.sum(t_y, axis=1)                                    # (LP,): t_ℓy
                s_y = tl.load(s_row + y_safe).to(tl.float32)
                log_sigma_y = tl.where(owns_y, (s_y - base_s) - log_zs, 0.0)
                pi_y = tl.exp((t_y - base_t) * inv_tau_v - log_zt)
                u_y = tl.where(owns_y, _target_u(pi_y, log_sigma_y, exp_beta_v, expm1_beta_v, w_v), 0.0)
                tl.store(row_out_ptr + row, u_over_D)
                tl.store(row_out_ptr + num_rows + row, u_log_D)
                tl.store(row_out_ptr + 2 * num_rows + row, log_sigma_y)
                _store_levels(row_out_ptr, 3, num_rows, row, u_level, levels64, level_ok)
                _store_levels(row_out_ptr, 3 + L, num_rows, row, u_log_q, levels64, level_ok)
                _store_levels(row_out_ptr, 3 + 2 * L, num_rows, row, u_y, levels64, level_ok)
            else:
                inv_G = tl.load(row_in_ptr + (2 + 2 * L) * num_rows + row)
                A = tl.load(row_in_ptr + (3 + 2 * L) * num_rows + row)
                R = _load_levels(row_in_ptr, 4 + 2 * L, num_rows, row, levels64, level_ok)
                if TOP_K:
                    _top_k_gradient(grad_row, grad_scale, s_row, cols0.to(tl.float32), num_classes, y_here,
                                    value_row, value_level_stride, value_k_stride, index_row, index_level_stride,
                                    index_k_stride, num_entries, class_offset, level_ok, rest, pi_rest, log_zs,
                                    base_s, log_zq, base_t, log_zt, tau_v, inv_tau_v, exp_beta_v, expm1_beta_v,
                                    w_v, inv_G, A, R, gate_weight, expert_weight, L, LP, BLOCK, KB, QB, False,
                                    SEARCH, HAS_EXPERT, HAS_GATE)
                else:
                    _gradient_of_blocks(grad_row, grad_scale, s_row, t_row, num_classes, level_ok, y_here, log_zs,
                                        base_s, log_zq, base_t, log_zt, tau_v, inv_tau_v, exp_beta_v, expm1_beta_v,
                                        w_v, inv_G, A, R, gate_weight, expert_weight, BLOCK, HAS_EXPERT, HAS_GATE)


@triton.jit
def scale_rows_kernel(grad_ptr, grad_row_stride, scale_ptr, scale_stride, num_classes, span,
                      BLOCK: tl.constexpr):
    """grad[i, :] *= scale[i], in place, in float32: backward's only N×C pass.

    Program (i, k) scales classes [k·span, (k+1)·span) of row i, BLOCK at a time, so
    a factor of 1 costs one scalar read per program. A "mean"/"sum" loss sends one
    value for every row: scale_stride = 0.
    """
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(scale_ptr + row * scale_stride)
    # grad_output = 1 (loss.backward() of the op's own reduction): nothing to read or write.
    if factor != 1.0:
        grad_row = grad_ptr + row * grad_row_stride
        first = tl.program_id(1) * span
        last = tl.minimum(first + span, num_classes)
        for start in range(first, last, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < last
            g = tl.load(grad_row + cols, mask=ok).to(tl.float32)
            tl.store(grad_row + cols, _round_to(g * factor, grad_ptr.dtype.element_ty), mask=ok)
