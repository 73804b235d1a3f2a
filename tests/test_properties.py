"""Property-based tests (hypothesis) for every backend usable on CPU tensors.

Each test draws random shapes, dtypes, hyper-parameters and ignored rows and holds
a backend to the float64 oracle (tests/oracle.py) and to the identities of the math:
zero-sum gradient rows, invariance to per-row shifts of s and t_ℓ, equivariance under
class permutations, 0 ≤ agreement ≤ 1, β = 0 ⇒ classic KD, and rows that do not
depend on the rest of the batch.

Error model. ``check_backend`` bounds the normwise relative error, which cannot hold
when the exact result is tiny next to the terms it is computed from: float32
cross-entropy of a confident row has an absolute error of about eps·|s| while its
value may be 1e-9, and so does this loss (its expert term is log σ_y + β r_y − Σ r log D,
three terms of size ~β whose sum vanishes once every expert is saturated). Outputs
are therefore compared as

    ‖actual − expected‖ ≤ tol · ‖expected‖  +  ABS_ULPS · eps₃₂ · ‖κ‖

where κ (per row) is the magnitude of those terms from a first-order error analysis
of the float32 formulas (see ``_scales``). For ordinary inputs the first term
dominates and this is ``check_backend``'s bound; only near-zero outputs use the second.

Loss and stats owe float32 accuracy for every input dtype (tests/oracle.py,
STATS_TOLERANCE); gradients are compared element by element (tests/oracle.py,
``check_gradient``) with 2^-19·κ as the cancellation headroom.

Budgets: the "ci" profile is small and derandomized; MOEKD_HYPOTHESIS_PROFILE=long
runs many random examples. Triton (interpreter on CPU) gets fewer, smaller examples.
What the draws reach (``cases``): rows past every block size (the CPU kernel's
1024-class sum blocks; Triton's multi-block path, forced with 32-value tiles under
the interpreter), τ = 1 and τ ≠ 1, −inf masks, float64 teachers, 1-3 levels, every
reduction (``test_reductions_match_float64_oracle``), and a few all-ignored batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

from _hypothesis import BACKENDS, budget, forced_small_blocks, large_classes, max_classes, max_rows
from moekd_kernels import fused_moe_kd_loss
from oracle import (DEFAULT_OPTIONS, STATS_TOLERANCE, ULPS, Case, check_gradient, classic_kd,
                    float64_oracle, make_case, rel_err, ulp)

EPS32 = torch.finfo(torch.float32).eps
ABS_ULPS = 16
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


# ---------------------------------------------------------------------------------
# Running a backend and comparing with float64
# ---------------------------------------------------------------------------------

@dataclass
class LongRowCase(Case):
    small_blocks: bool = False    # run with the backend's blocks forced small (_hypothesis.py)


@dataclass
class Result:
    loss: torch.Tensor            # (N,) float64 copy of the backend's per-row loss
    grad: torch.Tensor            # (N, C) float64 copy of ∂(Σ g_n loss_n)/∂s
    log_likelihood: torch.Tensor  # (N,)
    agreement: torch.Tensor       # (N,)
    raw_grad: torch.Tensor        # the gradient as returned, in the student's dtype


def _levels(case: Case) -> int:
    return case.teacher.shape[0] if case.teacher.dim() > case.student.dim() else 1


def _opts(case: Case) -> Dict:
    opts = {**DEFAULT_OPTIONS, **case.options}
    num_levels = _levels(case)
    for key in ("temperature", "expert_strength"):
        if not isinstance(opts[key], (list, tuple)):
            opts[key] = [opts[key]] * num_levels
    return opts


def run(backend: str, case: Case, grad_out: Optional[torch.Tensor] = None) -> Result:
    """The public API with reduction="none"; backward with per-row ``grad_out`` (default 1)."""
    student = case.student.detach().clone().requires_grad_(True)
    with forced_small_blocks(backend, getattr(case, "small_blocks", False)):
        loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, reduction="none",
                                        backend=backend, return_stats=True, **case.options)
    assert loss.dtype == torch.float32 and stats.agreement.dtype == torch.float32
    assert loss.shape == case.target.shape
    if grad_out is None:
        grad_out = torch.ones(case.target.shape, dtype=torch.float32)
    loss.backward(grad_out.to(loss.dtype).reshape(loss.shape))
    assert student.grad.dtype == case.student.dtype
    num_classes = case.student.shape[-1]
    return Result(loss.detach().double().reshape(-1),
                  student.grad.double().reshape(-1, num_classes),
                  stats.log_likelihood.double().reshape(-1),
                  stats.agreement.double().reshape(-1),
                  student.grad)


def _scales(case: Case) -> Dict[str, torch.Tensor]:
    """Per-row magnitudes κ of the float32 terms each output is formed from.

    M_s, M_t: largest finite |logit| of the row (student; teacher over levels).
    loss  : λ_e (M_s + β(2 + M_t/τ)) + λ_g (τ M_s + τ² log C + (M_t + τ)(2 M_s + τ log C))
            — log σ_y and τ² log q carry eps·M_s·τ; r carries eps·M_t/τ (relative),
            multiplied by |log q| ≤ 2 M_s/τ + log C and by log D ≤ β.
    grad  : (λ_e + λ_g τ) (1 + M_s + M_t/τ)  — relative errors of σ, q and r.
    stats : 1 + M_s + β + M_t/τ.
    """
    opts = _opts(case)
    num_classes = case.student.shape[-1]
    s = case.student.detach().double().reshape(-1, num_classes)
    t = case.teacher.detach().double().reshape(_levels(case), -1, num_classes)
    finite_abs = lambda x: torch.where(torch.isfinite(x), x.abs(), 0.0)  # noqa: E731
    m_s = finite_abs(s).amax(-1) if num_classes else torch.zeros(s.shape[0], dtype=torch.float64)
    m_t = finite_abs(t).amax(dim=(0, 2)) if num_classes else m_s
    tau_min, tau_max = min(opts["temperature"]), max(opts["temperature"])
    beta = max(opts["expert_strength"])
    lam_g, lam_e = opts["gate_weight"], opts["expert_weight"]
    log_c = math.log(max(num_classes, 2))
    loss = (lam_e * (m_s + beta * (2 + m_t / tau_min))
            + lam_g * (tau_max * m_s + tau_max ** 2 * log_c
                       + (m_t + tau_max) * (2 * m_s + tau_max * log_c)))
    grad = (lam_e + lam_g * tau_max) * (1 + m_s + m_t / tau_min)
    stats = 1 + m_s + beta + m_t / tau_min
    return {"loss": loss, "grad": grad, "stats": stats}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, kappa: torch.Tensor,
                 tol: float) -> float:
    """‖a − e‖ ≤ tol‖e‖ + ABS_ULPS·eps₃₂·‖κ‖ over finite entries; non-finite entries equal.

    Returns the error relative to the bound (≤ 1 passes).
    """
    rel = rel_err(actual, expected)  # also asserts the non-finite pattern matches
    expected = expected.detach().double().reshape(-1)
    norm = float(expected[torch.isfinite(expected)].norm())
    abs_err = rel * norm if norm > 0 else rel
    bound = tol * norm + ABS_ULPS * EPS32 * float(kappa.double().norm())
    assert abs_err <= bound, (f"{name}: |error| {abs_err:.3g} > bound {bound:.3g} "
                              f"(relative {rel:.3g}, tol {tol:g})")
    return abs_err / bound if bound > 0 else 0.0


def grad_headroom(kappa_grad: torch.Tensor) -> torch.Tensor:
    """The per-row scale handed to ``check_gradient``: 2^-20 of it is ABS_ULPS·eps₃₂·κ."""
    return kappa_grad * (ABS_ULPS * EPS32 * 2.0 ** 20)


def assert_grads_agree(name: str, actual: torch.Tensor, expected: torch.Tensor, kappa_grad: torch.Tensor) -> None:
    """Two gradients of the same problem in the same dtype (metamorphic tests), element by
    element: each is within 1 ulp (16-bit) or 1e-5 relative (float32) of the exact value,
    so they differ by at most twice that, plus 2·2^-19·κ where the row cancels."""
    a = actual.detach().double().reshape(-1, actual.shape[-1])
    b = expected.detach().double().reshape(a.shape)
    dtype = actual.dtype
    assert torch.equal(a.isfinite(), b.isfinite()) and torch.equal(a.isnan(), b.isnan()), f"{name}: non-finite"
    a, b = torch.where(a.isfinite(), a, 0.0), torch.where(b.isfinite(), b, 0.0)
    unit = 2 * ULPS[dtype] * ulp(b, dtype) if dtype in ULPS else 2e-5 * b.abs()
    row = torch.maximum(b.abs().amax(-1, keepdim=True), kappa_grad.double().reshape(-1, 1)) if a.numel() else 0
    bound = unit + 2 * ABS_ULPS * EPS32 * row
    bad = (a - b).abs() > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {a.numel()} elements differ beyond the bound; "
                           f"e.g. {a[bad][:3].tolist()} vs {b[bad][:3].tolist()}")


def check_against_oracle(backend: str, case: Case, seed: int = 0) -> Result:
    """Backend vs float64 oracle under the error model above, plus exact invariants."""
    tol = STATS_TOLERANCE[case.student.dtype]
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.rand(case.target.shape, generator=g, dtype=torch.float64) + 0.5
    got = run(backend, case, grad_out)
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    grad_out = grad_out.reshape(-1)
    kappa = _scales(case)
    valid = case.target.reshape(-1) != _opts(case)["ignore_index"]
    kappa = {k: torch.where(valid, v, 0.0) for k, v in kappa.items()}
    assert_close("loss", got.loss, exp_loss, kappa["loss"], tol)
    # grad_out reaches autograd as float32 (the loss dtype) and scales the stored gradient.
    grad_out = grad_out.float()
    check_gradient("grad", got.raw_grad, exp_grad, grad_headroom(kappa["grad"] * grad_out.double()), grad_out)
    assert_close("log_likelihood", got.log_likelihood, exp_ll, kappa["stats"], tol)
    assert_close("agreement", got.agreement, exp_agree, kappa["stats"], tol)
    check_exact_invariants(case, got)
    return got


def check_exact_invariants(case: Case, got: Result) -> None:
    """What holds with no tolerance at all: ignored rows are exactly zero, 0 ≤ a ≤ 1."""
    valid = case.target.reshape(-1) != _opts(case)["ignore_index"]
    ignored = ~valid
    assert (got.loss[ignored] == 0).all() and (got.grad[ignored] == 0).all()
    assert (got.log_likelihood[ignored] == 0).all() and (got.agreement[ignored] == 0).all()
    a = got.agreement[valid]
    assert ((a >= 0) & (a <= 1)).all(), f"agreement outside [0, 1]: {a[(a < 0) | (a > 1)].tolist()}"


# ---------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------

def _per_level(draw, strategy, num_levels):
    if num_levels > 1 and draw(st.booleans()):
        return draw(st.lists(strategy, min_size=num_levels, max_size=num_levels))
    return draw(strategy)


temperatures = st.one_of(st.sampled_from([1.0, 4.0]), st.floats(0.25, 10.0))
# β = 50 is MAX_EXPERT_STRENGTH: exp(β) near the top of what float32 kernels form.
strengths = st.one_of(st.sampled_from([0.0, 2.0, 50.0]), st.floats(0.0, 8.0), st.floats(0.0, 50.0))
# Weights are float32 in the kernels: keep them normal (a 1e-45 weight is a denormal).
term_weights = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-3, 2.0))


@st.composite
def options(draw, num_levels: int, *, beta=None, tau_one: bool = False) -> Dict:
    opts = {
        "temperature": 1.0 if tau_one else _per_level(draw, temperatures, num_levels),
        "expert_strength": beta if beta is not None else _per_level(draw, strengths, num_levels),
        "gate_weight": draw(term_weights),
        "expert_weight": draw(term_weights),
    }
    if num_levels > 1 and draw(st.booleans()):
        weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 3.0)),
                                min_size=num_levels, max_size=num_levels))
        if sum(weights) > 1e-3:
            opts["level_weights"] = weights
    if draw(st.booleans()):
        opts["ignore_index"] = draw(st.sampled_from([-1, 0, 3, 1000]))
    return opts


@st.composite
def cases(draw, backend: str, *, dtypes=ALL_DTYPES, max_levels: int = 3, beta=None,
          min_classes: int = 1, ignore: bool = True, long_rows: Optional[bool] = None,
          masks: bool = True) -> Case:
    """A random problem: shapes within the backend's limits, logits of random scale.

    ``long_rows`` (drawn for one case in five when None): a few rows past every block
    size of the backend (_hypothesis.large_classes), half of them at τ = 1 on every level
    (the multi-block rescale is the identity there: a path of its own in the kernels).
    ``masks``: −inf at random classes of the teacher, or of teacher and student alike
    (never the label's), in some cases.
    """
    if long_rows is None:
        long_rows = draw(st.sampled_from([False, False, False, False, True]))
    if long_rows:
        num_rows = draw(st.integers(1, 3))
        num_classes = draw(st.integers(*large_classes(backend)))
    else:
        num_rows = draw(st.integers(1, max_rows(backend)))
        num_classes = draw(st.integers(min_classes, max_classes(backend)))
    num_levels = draw(st.integers(1, max_levels))
    dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.sampled_from([dtype, dtype, torch.float32, torch.bfloat16, torch.float64]))
    opts = draw(options(num_levels, beta=beta, tau_one=long_rows and draw(st.booleans())))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    # All-ignored batches are an edge case, not the rule: one draw in ten (none for the
    # few rows of a long-row case, which are there to be computed).
    fractions = [0.0, 0.3] if long_rows else [0.0, 0.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.6, 0.6, 1.0]
    ignore_frac = draw(st.sampled_from(fractions)) if ignore else 0.0
    lead_shape = (num_rows,)
    if num_rows % 2 == 0 and draw(st.booleans()):
        lead_shape = (2, num_rows // 2)          # (B, T, C) inputs are flattened by the API
    case = make_case(num_rows, num_classes, num_levels, dtype=dtype, teacher_dtype=teacher_dtype,
                     seed=seed, ignore_frac=ignore_frac, lead_shape=lead_shape, **opts)
    # make_case draws logits of scale 3; rescale, and sometimes round to integers so
    # rows hold ties (several classes sharing the maximum).
    s_scale = draw(st.sampled_from([0.3, 1.0, 3.0, 8.0]))
    t_scale = draw(st.sampled_from([0.3, 1.0, 3.0, 8.0]))
    student, teacher = case.student.float() * s_scale, case.teacher.float() * t_scale
    if draw(st.booleans()):
        student, teacher = student.round(), teacher.round()
    mask_mode = draw(st.sampled_from(["none", "none", "teacher", "both"])) if masks else "none"
    if mask_mode != "none" and num_classes > 1:
        g = torch.Generator().manual_seed(seed + 1)
        masked = torch.rand(student.shape, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))
        label = case.target.long().clamp(0, num_classes - 1)
        masked = masked.scatter(-1, label[..., None], False)     # the label keeps probability
        teacher = teacher.masked_fill(masked, -math.inf)
        if mask_mode == "both":
            student = student.masked_fill(masked, -math.inf)
    case = LongRowCase(student.to(dtype), teacher.to(teacher_dtype), case.target, case.options,
                       small_blocks=long_rows)
    if draw(st.booleans()):
        case.target = case.target.int()
    note(f"N={num_rows} C={num_classes} L={num_levels} {dtype} teacher {teacher_dtype} "
         f"lead={lead_shape} scales={s_scale},{t_scale} masks={mask_mode} long={long_rows} options={opts}")
    return case


# ---------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------

def test_matches_float64_oracle(backend):
    @budget(backend, 2.0)
    @given(case=cases(backend), seed=st.integers(0, 1000))
    def prop(case, seed):
        check_against_oracle(backend, case, seed)

    prop()


def test_long_rows_match_float64_oracle(backend):
    """Rows past every block size, at τ = 1 and τ ≠ 1 (see ``cases``)."""
    @budget(backend, 1.0)
    @given(case=cases(backend, long_rows=True), seed=st.integers(0, 1000))
    def prop(case, seed):
        check_against_oracle(backend, case, seed)

    prop()


def test_reductions_match_float64_oracle(backend):
    """"mean" divides by the non-ignored rows (0 rows: loss 0, zero gradient), "sum" adds."""
    @budget(backend, 0.5)
    @given(case=cases(backend), reduction=st.sampled_from(["mean", "sum", "none"]),
           scale=st.sampled_from([1.0, 0.375]))
    def prop(case, reduction, scale):
        student = case.student.detach().clone().requires_grad_(True)
        with forced_small_blocks(backend, case.small_blocks):
            loss = fused_moe_kd_loss(student, case.teacher, case.target, reduction=reduction,
                                     backend=backend, **case.options)
        (scale * loss).sum().backward()
        exp_loss, exp_grad, _, _ = float64_oracle(case)
        valid = case.target.reshape(-1).long() != _opts(case)["ignore_index"]
        divisor = max(int(valid.sum()), 1) if reduction == "mean" else 1
        kappa = {k: torch.where(valid, v, 0.0) for k, v in _scales(case).items()}
        if reduction == "none":
            assert_close("loss", loss.detach().double().reshape(-1), exp_loss, kappa["loss"],
                         STATS_TOLERANCE[case.student.dtype])
        else:
            assert loss.shape == () and loss.dtype == torch.float32
            assert_close("loss", loss.detach().double().reshape(1), exp_loss.sum().reshape(1) / divisor,
                         kappa["loss"].sum().reshape(1) / divisor, STATS_TOLERANCE[case.student.dtype])
        # "mean" folds 1/divisor into the kernel; the factor scale is applied to the stored gradient.
        check_gradient("grad", student.grad, exp_grad / divisor, grad_headroom(kappa["grad"] * (scale / divisor)),
                       torch.full((exp_grad.shape[0],), scale))
        assert (student.grad.reshape(exp_grad.shape)[~valid] == 0).all()

    prop()


def test_gradient_rows_sum_to_zero(backend):
    """Σ_j ∂loss/∂s_j = 0 for every row: the loss is invariant to s + c·1."""

    @budget(backend)
    @given(case=cases(backend))
    def prop(case):
        got = run(backend, case)
        opts = _opts(case)
        dtype = case.student.dtype
        # Each element is a difference of bounded terms: λ_e (σ_j A + r_j + [j=y]) and
        # λ_g τ (R q_j + r_j). Their row sums are at most 3 λ_e + 2 λ_g Σ_ℓ τ_ℓ; the error
        # of the row sum is a few ulps of that, or half an ulp of |g_j| for 16-bit grads.
        scale = (3 * opts["expert_weight"] + 2 * opts["gate_weight"] * sum(opts["temperature"])
                 + got.grad.abs().sum(-1))
        unit = EPS32 * 32 if dtype == torch.float32 else torch.finfo(dtype).eps
        row_sums = got.grad.sum(-1)
        bad = row_sums.abs() > unit * scale
        assert not bad.any(), f"row sums {row_sums[bad].tolist()} (scale {scale[bad].tolist()})"
        check_exact_invariants(case, got)

    prop()


def _grid_logits(shape, generator, frac_bits: int, bound: float) -> torch.Tensor:
    """Random logits on a 2^-frac_bits grid in (−bound, bound): shifts by integers stay exact."""
    x = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.round(x * 2 ** frac_bits) / 2 ** frac_bits


# (fraction bits, largest |shift|) such that |s| < 8 plus the shift fits the mantissa.
_SHIFT_GRID = {torch.float32: (12, 1024), torch.float16: (4, 64), torch.bfloat16: (3, 8)}


def test_shift_invariance(backend):
    """s + c_n and t_ℓ + c_ℓn (per-row constants) change nothing.

    Logits live on a grid where the shifted values are exact in the input dtype, so the
    shifted problem is mathematically the same problem; the bound allows the rounding
    that magnitude |s + c| costs in float32 (κ grows with the shift).
    """

    @budget(backend)
    @given(base=cases(backend), data=st.data())
    def prop(base, data):
        dtype = base.student.dtype
        if base.teacher.dtype != dtype:
            base.teacher = base.teacher.to(dtype)
        frac_bits, max_shift = _SHIFT_GRID[dtype]
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), "seed"))
        num_rows = base.target.numel()
        student = _grid_logits(base.student.shape, g, frac_bits, 8.0)
        teacher = _grid_logits(base.teacher.shape, g, frac_bits, 8.0)
        base = Case(student.to(dtype), teacher.to(dtype), base.target, base.options)

        shifts = st.integers(-max_shift, max_shift)
        s_shift = torch.tensor(data.draw(st.lists(shifts, min_size=num_rows, max_size=num_rows),
                                         "student shifts"), dtype=torch.float64)
        levels = _levels(base)
        t_shift = torch.tensor(data.draw(st.lists(shifts, min_size=levels * num_rows,
                                                  max_size=levels * num_rows), "teacher shifts"),
                               dtype=torch.float64).reshape(levels, num_rows)
        shifted_s = student + s_shift.reshape(base.student.shape[:-1] + (1,))
        t_view = teacher.reshape(levels, num_rows, -1) + t_shift[..., None]
        shifted_t = t_view.reshape(teacher.shape)
        shifted = Case(shifted_s.to(dtype), shifted_t.to(dtype), base.target, base.options)
        # The premise: the shifted logits are exact in the input dtype.
        assert torch.equal(shifted.student.double(), shifted_s)
        assert torch.equal(shifted.teacher.double(), shifted_t)

        want = run(backend, base)
        got = run(backend, shifted)
        tol = STATS_TOLERANCE[dtype]
        kappa = {k: a + b for (k, a), b in zip(_scales(shifted).items(), _scales(base).values())}
        assert_close("loss", got.loss, want.loss, kappa["loss"], 2 * tol)
        assert_grads_agree("grad", got.raw_grad, want.raw_grad, kappa["grad"])
        assert_close("log_likelihood", got.log_likelihood, want.log_likelihood, kappa["stats"], 2 * tol)
        assert_close("agreement", got.agreement, want.agreement, kappa["stats"], 2 * tol)
        check_exact_invariants(shifted, got)

    prop()


def test_class_permutation_equivariance(backend):
    """Permuting the classes (labels with them) permutes the gradient; loss and stats stay."""

    @budget(backend)
    @given(case=cases(backend), data=st.data())
    def prop(case, data):
        num_classes = case.student.shape[-1]
        ignore_index = _opts(case)["ignore_index"]
        # An ignore_index inside [0, C) names a class too: it stays in place, so no label
        # is moved onto it (or off it).
        movable = [c for c in range(num_classes) if c != ignore_index]
        shuffled = iter(data.draw(st.permutations(movable), "perm"))
        perm = torch.tensor([c if c == ignore_index else next(shuffled) for c in range(num_classes)])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(num_classes)
        target = case.target.clone()
        keep = (target >= 0) & (target < num_classes)
        target[keep] = inverse[target[keep].long()].to(target.dtype)
        permuted = Case(case.student[..., perm], case.teacher[..., perm], target, case.options)
        want = run(backend, case)
        got = run(backend, permuted)
        tol = STATS_TOLERANCE[case.student.dtype]
        kappa = _scales(case)
        assert_close("loss", got.loss, want.loss, kappa["loss"], 2 * tol)
        assert_grads_agree("grad", got.raw_grad.reshape(-1, num_classes),
                           want.raw_grad.reshape(-1, num_classes)[:, perm], kappa["grad"])
        assert_close("log_likelihood", got.log_likelihood, want.log_likelihood, kappa["stats"], 2 * tol)
        assert_close("agreement", got.agreement, want.agreement, kappa["stats"], 2 * tol)

    prop()


def test_beta_zero_is_classic_kd(backend):
    """β = 0: r_ℓc = w_ℓ π_ℓc, so the loss is Σ_ℓ w_ℓ · (Hinton KD at τ_ℓ) plus the
    constant λ_g Σ_ℓ w_ℓ τ_ℓ² H(π_ℓ), and the gradients are equal."""

    @budget(backend)
    @given(case=cases(backend, beta=0.0, masks=False))
    def prop(case):
        opts = _opts(case)
        levels = _levels(case)
        weights = opts["level_weights"] or [1.0] * levels
        weights = [w / sum(weights) for w in weights]
        num_classes = case.student.shape[-1]
        s = case.student.detach().double().reshape(-1, num_classes).requires_grad_(True)
        t = case.teacher.detach().double().reshape(levels, -1, num_classes)
        y = case.target.reshape(-1).long()
        ignore = opts["ignore_index"]
        kd = torch.zeros(y.shape, dtype=torch.float64)
        constant = torch.zeros(y.shape, dtype=torch.float64)
        agreement = torch.zeros(y.shape, dtype=torch.float64)
        valid = y != ignore
        safe_y = torch.where(valid, y, 0)
        for level in range(levels):
            tau = opts["temperature"][level]
            kd = kd + weights[level] * classic_kd(s, t[level], torch.where(valid, y, -100), temperature=tau,
                                                  gate_weight=opts["gate_weight"],
                                                  expert_weight=opts["expert_weight"])
            pi = F.softmax(t[level] / tau, dim=-1)
            entropy = -torch.special.xlogy(pi, pi).sum(-1)
            constant = constant + opts["gate_weight"] * weights[level] * tau ** 2 * entropy
            agreement = agreement + weights[level] * pi.gather(1, safe_y[:, None]).squeeze(1)
        expected = torch.where(valid, kd + constant, 0.0)
        (kd_grad,) = torch.autograd.grad(kd.sum(), s)
        log_sigma_y = F.log_softmax(s.detach(), -1).gather(1, safe_y[:, None]).squeeze(1)

        got = run(backend, case)
        tol = STATS_TOLERANCE[case.student.dtype]
        kappa = _scales(case)
        kappa = {k: torch.where(valid, v, 0.0) for k, v in kappa.items()}
        assert_close("loss", got.loss, expected, kappa["loss"], tol)
        check_gradient("grad", got.raw_grad, kd_grad, grad_headroom(kappa["grad"]))
        # G = Σ_ℓ w_ℓ = 1, so m = log σ_y; and a = Σ_ℓ w_ℓ π_ℓy.
        assert_close("log_likelihood", got.log_likelihood, torch.where(valid, log_sigma_y, 0.0),
                     kappa["stats"], tol)
        assert_close("agreement", got.agreement, torch.where(valid, agreement, 0.0), kappa["stats"], tol)

    prop()


def test_rows_do_not_depend_on_the_batch(backend):
    """A row's loss, stats and gradient are the same alone, in its batch, and in a
    shuffled batch padded with other rows."""

    @budget(backend)
    @given(case=cases(backend), data=st.data())
    def prop(case, data):
        num_classes = case.student.shape[-1]
        levels = _levels(case)
        s = case.student.reshape(-1, num_classes)
        t = case.teacher.reshape(levels, -1, num_classes)
        y = case.target.reshape(-1)
        num_rows = y.numel()
        extra = make_case(data.draw(st.integers(0, max_rows(backend)), "extra rows"), num_classes, levels,
                          dtype=s.dtype, teacher_dtype=t.dtype, seed=data.draw(st.integers(0, 999), "seed"),
                          ignore_index=_opts(case)["ignore_index"])
        order = torch.tensor(data.draw(st.permutations(range(num_rows + extra.target.numel())), "order"))
        big = Case(torch.cat([s, extra.student.reshape(-1, num_classes)])[order],
                   torch.cat([t, extra.teacher.reshape(levels, -1, num_classes)], dim=1)[:, order],
                   torch.cat([y, extra.target.to(y.dtype)])[order], case.options)
        if levels == 1:
            big.teacher = big.teacher[0]
        position = torch.argsort(order)[:num_rows]    # where each original row went

        whole = run(backend, Case(s, t if levels > 1 else t[0], y, case.options))
        mixed = run(backend, big)
        row = data.draw(st.integers(0, num_rows - 1), "row")
        alone = run(backend, Case(s[row:row + 1], t[:, row:row + 1] if levels > 1 else t[0, row:row + 1],
                                  y[row:row + 1], case.options))
        tol = STATS_TOLERANCE[case.student.dtype]
        kappa = _scales(case)
        pairs = [("batch vs shuffled", whole, mixed, position, slice(None)),
                 ("batch vs alone", whole, alone, torch.tensor([0]), slice(row, row + 1))]
        for label, a, b, index, rows in pairs:
            assert_close(f"{label} loss", b.loss[index], a.loss[rows], kappa["loss"][rows], tol)
            assert_grads_agree(f"{label} grad", b.raw_grad.reshape(-1, num_classes)[index],
                               a.raw_grad.reshape(-1, num_classes)[rows], kappa["grad"][rows])
            assert_close(f"{label} log_likelihood", b.log_likelihood[index], a.log_likelihood[rows],
                         kappa["stats"][rows], tol)
            assert_close(f"{label} agreement", b.agreement[index], a.agreement[rows],
                         kappa["stats"][rows], tol)

    prop()
