"""Adversarial inputs with exact expectations, for every backend usable on CPU tensors.

Masked (−inf) classes, masked targets, huge logits, NaN rows, empty batches, C = 1,
strided / transposed / broadcast inputs, narrow integer targets, custom ignore_index,
teachers that require grad, and inputs that must come back untouched. The bad-argument
errors are in tests/test_options.py; the few it does not cover are at the end here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _hypothesis import BACKENDS
from moekd_kernels import fused_moe_kd_loss
from moekd_kernels.backends import BACKENDS as REGISTRY
from moekd_kernels.options import MAX_EXPERT_STRENGTH
from oracle import (TOLERANCE, Case, check_backend, check_outputs, closed_form_oracle, float64_oracle,
                    kernel_options, make_case, naive_oracle, rel_err, term_scale)

INF, NAN = math.inf, math.nan
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

backends = pytest.mark.parametrize("backend", BACKENDS)


def _per_row(backend, student, teacher, target, **options):
    """(loss, log_likelihood, agreement, grad) per row through the public API."""
    student = student.detach().clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(student, teacher, target, reduction="none", backend=backend,
                                    return_stats=True, **options)
    loss.sum().backward()
    return loss.detach(), stats.log_likelihood, stats.agreement, student.grad


def _check_vs_closed_form(backend, student, teacher, target, **options):
    """Backend vs the float64 closed-form oracle, for inputs where the naive mixture breaks
    down: once log p(y) < −745 (a logit gap of ~1e3) every term of Σ w π p(y) underflows in
    float64 and its r is 0/0; the closed form works in log space (tests/oracle.py)."""
    got = _per_row(backend, student, teacher, target, **options)
    case = Case(student, teacher, target, options)
    exp_loss, exp_grad, exp_ll, exp_agree = closed_form_oracle(case)
    loss, ll, agreement, grad = got
    check_outputs(backend, (loss, grad.reshape(exp_grad.shape), ll, agreement),
                  (exp_loss, exp_grad, exp_ll, exp_agree), student.dtype, grad_scale=term_scale(case))
    return got


# ---------------------------------------------------------------------------------
# −inf: masked classes and masked targets
# ---------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("num_levels", [1, 3])
def test_classes_masked_in_student_and_teacher_are_removed(backend, dtype, num_levels):
    """A class at −inf in the student and every teacher level drops out: the row's loss,
    stats and gradient equal those of the problem without that class (a different
    class set per row), and the masked entries' gradient is exactly 0."""
    num_rows, num_classes = 6, 11
    case = make_case(num_rows, num_classes, num_levels, dtype=dtype, seed=21, ignore_frac=0.0,
                     temperature=[2.0, 4.0, 1.0][:num_levels] if num_levels > 1 else 2.0,
                     expert_strength=[1.0, 3.0, 0.5][:num_levels] if num_levels > 1 else 3.0)
    g = torch.Generator().manual_seed(22)
    masked = torch.rand(num_rows, num_classes, generator=g) < 0.4
    masked[torch.arange(num_rows), case.target] = False   # the label stays visible
    masked[0] = False                                      # one row with nothing masked
    masked[1, :] = True
    masked[1, case.target[1]] = False                      # one row with only the label left
    student = case.student.masked_fill(masked, -INF)
    teacher = case.teacher.masked_fill(masked, -INF)
    loss, ll, agreement, grad = _per_row(backend, student, teacher, case.target, **case.options)

    assert torch.isfinite(loss).all() and torch.isfinite(ll).all() and torch.isfinite(agreement).all()
    assert torch.isfinite(grad).all()
    assert (grad[masked] == 0).all()
    tol = TOLERANCE[dtype]
    for n in range(num_rows):
        keep = ~masked[n]
        y = int(keep[: case.target[n]].sum())             # the label's index among kept classes
        t_row = teacher[..., n:n + 1, :][..., keep]
        reduced = Case(student[n:n + 1, keep], t_row, torch.tensor([y]), case.options)
        exp_loss, exp_grad, exp_ll, exp_agree = naive_oracle(reduced)
        assert rel_err(loss[n:n + 1], exp_loss) <= tol
        assert rel_err(ll[n:n + 1], exp_ll) <= tol
        assert rel_err(agreement[n:n + 1], exp_agree) <= tol
        assert rel_err(grad[n, keep], exp_grad[0]) <= tol


@backends
def test_classes_masked_in_teacher_only(backend):
    """π = 0 there, so r = 0: finite, NaN-free, and equal to the oracle (the student's
    own probability on those classes still enters σ, q and the gradient)."""
    case = make_case(8, 13, 2, seed=23, ignore_frac=0.2)
    teacher = case.teacher.clone()
    teacher[0, :, 2] = -INF
    teacher[:, :, 5] = -INF
    teacher[1, 3, :] = -INF
    teacher[1, 3, 7] = 0.0                                 # a level with a single live class
    masked_case = Case(case.student, teacher, case.target)
    check_backend(backend, masked_case)
    loss, ll, agreement, grad = _per_row(backend, case.student, teacher, case.target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@backends
def test_classes_masked_in_student_only(backend):
    """σ = q = 0 on a class the teacher still believes in.

    Without the gate term (λ_g = 0) nothing is infinite: those experts have D = 1 and
    log p(y) = log σ_y. With it, −Σ r log q = +inf (KL(π‖q) is infinite where q = 0 and
    π > 0), exactly as docs/math.md (Numerics) says: loss +inf, never NaN, gradient and stats finite.
    """
    case = make_case(6, 9, 2, seed=24, ignore_frac=0.0)
    student = case.student.clone()
    masked = torch.zeros_like(student, dtype=torch.bool)
    masked[:, 4] = True
    masked[2, 6] = True
    masked[torch.arange(6), case.target] = False
    student = student.masked_fill(masked, -INF)

    no_gate = Case(student, case.teacher, case.target, {"gate_weight": 0.0})
    check_backend(backend, no_gate)
    loss, ll, agreement, grad = _per_row(backend, student, case.teacher, case.target, gate_weight=0.0)
    assert torch.isfinite(loss).all() and (grad[masked] == 0).all()

    with_gate = Case(student, case.teacher, case.target)
    check_backend(backend, with_gate)
    loss, ll, agreement, grad = _per_row(backend, student, case.teacher, case.target)
    rows = masked.any(dim=1)
    assert (loss[rows] == INF).all() and torch.isfinite(loss[~rows]).all()
    assert torch.isfinite(grad).all() and torch.isfinite(ll).all() and torch.isfinite(agreement).all()


@backends
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tau", [0.5, 4.0])
def test_masking_with_the_dtype_minimum_equals_masking_with_minus_inf(backend, dtype, tau):
    """Many pipelines mask with torch.finfo(dtype).min instead of −inf (it overflows to
    −inf once divided by τ < 1). Either way the class carries no probability."""
    case = make_case(6, 10, 2, dtype=dtype, seed=41, ignore_frac=0.0)
    masked = torch.zeros(6, 10, dtype=torch.bool)
    masked[:, [0, 7]] = True
    masked[3, 2:6] = True
    masked[torch.arange(6), case.target] = False
    lowest = torch.finfo(dtype).min
    with_inf = _per_row(backend, case.student.masked_fill(masked, -INF), case.teacher.masked_fill(masked, -INF),
                        case.target, temperature=tau)
    with_min = _per_row(backend, case.student.masked_fill(masked, lowest),
                        case.teacher.masked_fill(masked, lowest), case.target, temperature=tau)
    for name, a, b in zip(("loss", "log_likelihood", "agreement", "grad"), with_min, with_inf):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= TOLERANCE[dtype], name
    assert (with_min[3][masked] == 0).all()


@backends
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("teacher_masks_it_too", [False, True])
def test_masked_target_gives_inf_like_cross_entropy(backend, dtype, teacher_masks_it_too):
    case = make_case(5, 10, 2, dtype=dtype, seed=25, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    target = torch.tensor([3, 0, 9, 4, 4])
    student[0, 3] = -INF
    student[2, 9] = -INF
    if teacher_masks_it_too:
        teacher[:, 0, 3] = -INF
        teacher[:, 2, 9] = -INF
    expected_ce = F.cross_entropy(student.float(), target, reduction="none")
    assert expected_ce[0] == INF and expected_ce[2] == INF

    loss, ll, agreement, grad = _per_row(backend, student, teacher, target)
    assert loss[0] == INF and loss[2] == INF and torch.isfinite(loss[[1, 3, 4]]).all()
    assert ll[0] == -INF and ll[2] == -INF
    assert torch.isfinite(agreement).all() and ((agreement >= 0) & (agreement <= 1)).all()
    assert torch.isfinite(grad).all()
    # Every expert gives p(y) = 0 here, so the naive oracle's r is 0/0; the closed form's
    # r is its limit as s_y → −inf.
    _check_vs_closed_form(backend, student, teacher, target)
    for reduction in ("mean", "sum"):
        total = fused_moe_kd_loss(student, teacher, target, reduction=reduction, backend=backend)
        assert total == INF


# ---------------------------------------------------------------------------------
# Huge logits
# ---------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("tau", [0.25, 4.0])
def test_logits_of_1e4_in_float32(backend, tau):
    """|s|, |t| up to 1e4 (and 4e4 after /τ): finite everywhere, float32-accurate."""
    g = torch.Generator().manual_seed(26)
    shape = (6, 12)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    student = torch.where(torch.rand(shape, generator=g) < 0.5, 1e4 * sign, 3 * torch.randn(shape, generator=g))
    teacher = torch.where(torch.rand((2,) + shape, generator=g) < 0.5, -1e4, 1e4)
    student[0] = 1e4                                        # a row of ties at the top
    target = torch.tensor([0, 3, 5, 7, 11, -100])
    for options in ({"temperature": tau}, {"temperature": tau, "expert_strength": MAX_EXPERT_STRENGTH},
                    {"temperature": tau, "gate_weight": 0.0}):
        loss, ll, agreement, grad = _per_row(backend, student, teacher, target, **options)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.isfinite(ll).all() and torch.isfinite(agreement).all()
        _check_vs_closed_form(backend, student, teacher, target, **options)


@backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_near_the_top_of_their_range(backend, dtype):
    """float16 up to ±65504 (its largest finite value), and bfloat16 at ±1e4: the float32
    accumulation must not overflow (s/τ with τ = 0.5 is 1.3e5, beyond float16)."""
    big = torch.finfo(torch.float16).max if dtype == torch.float16 else 1e4
    g = torch.Generator().manual_seed(27)
    shape = (5, 16)
    scale = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0) * torch.rand(shape, generator=g)
    student = (big * scale).to(dtype)
    student[0, :] = big
    student[1, 3] = -big
    teacher = (big * scale.flip(1)).to(dtype)
    target = torch.tensor([2, 3, 0, 15, 8])
    for tau in (0.5, 4.0):
        loss, ll, agreement, grad = _per_row(backend, student, teacher, target, temperature=tau)
        assert not loss.isnan().any() and not grad.isnan().any()
        assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
        _check_vs_closed_form(backend, student, teacher, target, temperature=tau)


# ---------------------------------------------------------------------------------
# NaN stays in its row; ignored rows are never read into the result
# ---------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_poisons_its_own_row_only(backend, where):
    case = make_case(5, 14, 2, seed=28, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    if where == "student":
        student[2, 6] = NAN
    else:
        teacher[1, 2, 13] = NAN
    clean = _per_row(backend, case.student, case.teacher, case.target)
    dirty = _per_row(backend, student, teacher, case.target)
    for name, got, ref in zip(("loss", "log_likelihood", "agreement"), dirty[:3], clean[:3]):
        assert got[2].isnan(), f"{name} of the NaN row is {got[2]}"
        others = [0, 1, 3, 4]
        assert torch.equal(got[others], ref[others]), f"{name} of the other rows changed"
    assert dirty[3][2].isnan().all()
    assert torch.equal(dirty[3][[0, 1, 3, 4]], clean[3][[0, 1, 3, 4]])
    for reduction in ("mean", "sum"):
        assert fused_moe_kd_loss(student, teacher, case.target, reduction=reduction, backend=backend).isnan()


@backends
def test_nan_and_inf_in_ignored_rows_change_nothing(backend):
    """Padding rows may hold garbage: an ignored row gives exactly 0 (loss, stats,
    gradient) whatever it holds, and the mean stays finite."""
    case = make_case(6, 10, 2, seed=29, ignore_frac=0.0)
    target = case.target.clone()
    target[[1, 4]] = -100
    student, teacher = case.student.clone(), case.teacher.clone()
    student[1] = NAN
    teacher[:, 4] = INF
    student[4, 0] = -INF
    clean = _per_row(backend, case.student, case.teacher, target)
    dirty = _per_row(backend, student, teacher, target)
    for got, ref in zip(dirty, clean):
        assert torch.equal(got, ref)
    assert (dirty[0][[1, 4]] == 0).all() and (dirty[3][[1, 4]] == 0).all()
    loss = fused_moe_kd_loss(student, teacher, target, backend=backend)
    assert torch.isfinite(loss)


@backends
def test_rows_without_a_distribution_give_nan(backend):
    """An all −inf student row (F.cross_entropy gives NaN too), an all −inf teacher level
    (π undefined), a +inf logit (inf − inf): NaN for that row, never a finite number,
    and the other rows untouched."""
    case = make_case(5, 6, 1, seed=42, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    student[0] = -INF
    teacher[1] = -INF
    student[2, 4] = INF
    teacher[3, 5] = INF
    assert F.cross_entropy(student[:1], case.target[:1]).isnan()
    clean = _per_row(backend, case.student, case.teacher, case.target)
    dirty = _per_row(backend, student, teacher, case.target)
    for got, ref in zip(dirty[:3], clean[:3]):
        assert got[:4].isnan().all() and torch.equal(got[4], ref[4])
    assert dirty[3][:4].isnan().any(dim=1).all() and torch.equal(dirty[3][4], clean[3][4])


@backends
def test_out_of_range_targets_at_the_backend_level_give_nan_rows(backend):
    """The Python layer rejects them for CPU tensors; a backend handed one anyway (as a
    GPU kernel is, unchecked) must not read out of bounds and returns NaN for that row."""
    case = make_case(5, 7, 2, seed=30, ignore_frac=0.0)
    target = torch.tensor([1, 7, -3, 2**40, 0])
    loss, ll, agreement, grad = REGISTRY[backend].forward(case.student, case.teacher, target, kernel_options(2))
    bad = torch.tensor([False, True, True, True, False])
    for rows in (loss, ll, agreement):
        assert rows[bad].isnan().all() and torch.isfinite(rows[~bad]).all()
    assert torch.isfinite(grad[~bad]).all()


# ---------------------------------------------------------------------------------
# Degenerate shapes
# ---------------------------------------------------------------------------------

@backends
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("num_levels", [1, 2])
def test_empty_batch(backend, lead, num_levels):
    num_classes = 5
    student = torch.randn(*lead, num_classes, requires_grad=True)
    teacher = torch.randn(*((num_levels,) if num_levels > 1 else ()), *lead, num_classes)
    target = torch.zeros(lead, dtype=torch.long)
    for reduction in ("mean", "sum"):
        loss = fused_moe_kd_loss(student, teacher, target, reduction=reduction, backend=backend)
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
        assert student.grad.shape == student.shape
        student.grad = None
    loss, stats = fused_moe_kd_loss(student, teacher, target, reduction="none", backend=backend,
                                    return_stats=True)
    assert loss.shape == lead and stats.agreement.shape == lead and stats.log_likelihood.shape == lead


@backends
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 2.0, 20.0, MAX_EXPERT_STRENGTH])
def test_single_class(backend, dtype, beta):
    """C = 1: σ = q = π = 1, every expert is certain, r_ℓ = w_ℓ. Loss 0, gradient 0,
    log-likelihood 0 and agreement 1, up to float32 rounding of O(1) terms."""
    case = make_case(4, 1, 2, dtype=dtype, seed=31, ignore_frac=0.25, expert_strength=beta,
                     level_weights=[1.0, 3.0])
    loss, ll, agreement, grad = _per_row(backend, case.student, case.teacher, case.target, **case.options)
    valid = case.target != -100
    ulp = 4 * torch.finfo(torch.float32).eps
    assert (loss.abs() <= ulp * (1 + beta)).all(), loss
    assert (ll.abs() <= ulp * (1 + beta)).all(), ll
    assert ((agreement[valid] - 1).abs() <= ulp).all() and (agreement <= 1).all(), agreement
    assert (grad.float().abs() <= 4 * ulp).all(), grad
    check_backend(backend, case)


@backends
def test_two_classes_with_certain_experts(backend):
    """C = 2 with β = 50: the expert gradient is O(e^-β) and must not pick up errors
    that grow with exp(β) (|∂loss/∂s| is bounded by λ_e + λ_g Σ τ whatever β is)."""
    student = torch.tensor([[5.0, 0.0], [0.0, 5.0], [2.0, -1.0]])
    teacher = torch.zeros(3, 2)
    target = torch.tensor([0, 1, 0])
    for beta in (30.0, 44.0, 50.0):
        case = Case(student, teacher, target, {"expert_strength": beta, "gate_weight": 0.0})
        loss, ll, agreement, grad = _per_row(backend, student, teacher, target, **case.options)
        _, exp_grad, _, _ = float64_oracle(case)
        assert (grad - exp_grad).abs().max() <= 16 * torch.finfo(torch.float32).eps, (beta, grad, exp_grad)


# ---------------------------------------------------------------------------------
# Layouts: strided, transposed, broadcast; target dtypes; ignore_index
# ---------------------------------------------------------------------------------

def _layouts(num_rows, num_classes, num_levels, g):
    """(name, student view of a leaf, the leaf, teacher (L, N, C), target): none contiguous."""
    C = num_classes
    wide_s = 3 * torch.randn(num_rows, 2 * C + 3, generator=g)
    row_major_t = 3 * torch.randn(num_rows, num_levels, C, generator=g)      # (N, L, C) storage
    wide_t = 3 * torch.randn(num_levels, num_rows, 2 * C, generator=g)
    class_major_s = 3 * torch.randn(C, num_rows, generator=g)
    class_major_t = 3 * torch.randn(num_levels, C, num_rows, generator=g)
    long_y = torch.randint(0, C, (2 * num_rows,), generator=g)
    long_y[3] = -100
    row = 3 * torch.randn(C, generator=g)
    one_t = 3 * torch.randn(1, 1, C, generator=g)
    return [
        ("row-strided student, level-major view of an (N, L, C) teacher, strided target",
         lambda s: s[:, 3:3 + C], wide_s, row_major_t.permute(1, 0, 2), long_y[::2]),
        ("class-strided student and teacher",
         lambda s: s[:, 1::2][:, :C], wide_s, wide_t[..., ::2], long_y[1::2]),
        ("transposed student and teacher",
         lambda s: s.t(), class_major_s, class_major_t.transpose(1, 2), long_y[:num_rows]),
        ("broadcast student row, teacher shared by levels and rows, broadcast target",
         lambda s: s.expand(num_rows, C), row, one_t.expand(num_levels, num_rows, C),
         long_y[:1].clamp(min=0).expand(num_rows)),
    ]


@backends
@pytest.mark.parametrize("num_levels", [1, 3])
@pytest.mark.parametrize("layout", range(4))
def test_strided_transposed_and_broadcast_inputs(backend, num_levels, layout):
    num_rows, num_classes = 6, 9
    g = torch.Generator().manual_seed(32)
    name, view, base, teacher, target = _layouts(num_rows, num_classes, num_levels, g)[layout]
    if num_levels == 1:
        teacher = teacher[0]
    leaf = base.clone().requires_grad_(True)
    student = view(leaf)
    assert student.shape == (num_rows, num_classes), name
    assert not student.is_contiguous() or student.stride(0) == 0 or student.stride(1) != 1, name
    options = {"temperature": 2.0, "expert_strength": 3.0}
    loss, stats = fused_moe_kd_loss(student, teacher, target, reduction="none", backend=backend,
                                    return_stats=True, **options)
    weights = torch.linspace(0.5, 1.5, num_rows)
    (grad,) = torch.autograd.grad(loss, student, weights)

    dense = Case(student.detach().contiguous(), teacher.contiguous(), target.contiguous(), options)
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(dense)
    assert rel_err(loss, exp_loss) <= 1e-5, name
    assert rel_err(grad, exp_grad * weights[:, None].double()) <= 1e-5, name
    assert rel_err(stats.log_likelihood, exp_ll) <= 1e-5 and rel_err(stats.agreement, exp_agree) <= 1e-5
    # Same numbers as for dense copies of the same values: strides change no result.
    dense_out = _per_row(backend, dense.student, dense.teacher, dense.target, **options)
    assert torch.equal(loss.detach(), dense_out[0]), name
    # The gradient reaches the leaf through the view (summed over broadcast rows).
    leaf_grad = torch.autograd.grad(fused_moe_kd_loss(view(leaf), teacher, target, reduction="sum",
                                                      backend=backend, **options), leaf)[0]
    assert torch.isfinite(leaf_grad).all()


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("teacher_dtype", KERNEL_DTYPES + (torch.float64,))
def test_teacher_dtype_may_differ_from_the_student(backend, dtype, teacher_dtype):
    """docs/math.md, Numerics: teacher and student dtypes may differ; the API takes any floating teacher.
    backend="auto" picks by the student's dtype, so every kernel it may pick has to
    take a float64 teacher too (precomputed teacher logits are often float64)."""
    case = make_case(6, 20, 2, dtype=dtype, teacher_dtype=teacher_dtype, seed=43)
    check_backend(backend, case)


@pytest.mark.parametrize("num_levels", [8, 9, 12])
def test_auto_backend_takes_any_number_of_levels(num_levels):
    """The API accepts any L >= 1; backend="auto" must not pick a kernel that then
    refuses the call (the C++ kernel holds at most kMaxLevels = 8 levels)."""
    case = make_case(4, 10, num_levels, seed=44, ignore_frac=0.0)
    check_backend("auto", case)


@backends
def test_student_with_batch_and_time_dims_that_cannot_be_viewed(backend):
    """(B, T, C) transposed to (T, B, C): flattening has to copy, the result must not care."""
    g = torch.Generator().manual_seed(33)
    student = (3 * torch.randn(4, 3, 10, generator=g)).transpose(0, 1)
    teacher = (3 * torch.randn(2, 4, 3, 10, generator=g)).transpose(1, 2)
    target = torch.randint(0, 10, (4, 3), generator=g).t()
    check_backend(backend, Case(student, teacher, target, {"temperature": [1.0, 3.0]}))


@backends
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrow_integer_targets_match_int64(backend, dtype):
    """Every integer dtype the API accepts gives the int64 result exactly."""
    case = make_case(8, 12, 2, seed=34, ignore_frac=0.0)
    target = case.target.clone()
    ignore = 255 if dtype == torch.uint8 else -1
    target[[2, 5]] = ignore
    want = _per_row(backend, case.student, case.teacher, target, ignore_index=ignore)
    got = _per_row(backend, case.student, case.teacher, target.to(dtype), ignore_index=ignore)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[0][[2, 5]] == 0).all()


@backends
@pytest.mark.parametrize("ignore_index", [-1, 0, 3, 11, 10**6])
def test_custom_ignore_index(backend, ignore_index):
    """ignore_index may be any int, including a valid class: those rows are skipped."""
    case = make_case(10, 12, 2, seed=35, ignore_frac=0.3, ignore_index=ignore_index)
    if 0 <= ignore_index < 12:
        case.target[:2] = ignore_index
    ignored = case.target == ignore_index
    assert ignored.any() and not ignored.all()
    check_backend(backend, case)
    loss, ll, agreement, grad = _per_row(backend, case.student, case.teacher, case.target, **case.options)
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert (ll[ignored] == 0).all() and (agreement[ignored] == 0).all()
    assert (grad[~ignored] != 0).any(dim=1).all()
    mean = fused_moe_kd_loss(case.student, case.teacher, case.target, backend=backend, **case.options)
    assert torch.allclose(mean, loss.sum() / (~ignored).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------------
# Autograd hygiene: teacher gets nothing, inputs are never written
# ---------------------------------------------------------------------------------

@backends
def test_teacher_requiring_grad_gets_none_and_raises_nothing(backend):
    g = torch.Generator().manual_seed(36)
    features = torch.randn(6, 8, generator=g)
    teacher_head = torch.nn.Linear(8, 10)
    student_head = torch.nn.Linear(8, 10)
    target = torch.randint(0, 10, (6,), generator=g)
    teacher_leaf = torch.randn(2, 6, 10, generator=g, requires_grad=True)
    for teacher in (teacher_head(features), teacher_leaf):        # non-leaf and leaf
        student = student_head(features)
        loss = fused_moe_kd_loss(student, teacher, target, backend=backend)
        loss.backward()
        assert student_head.weight.grad is not None and torch.isfinite(student_head.weight.grad).all()
        student_head.zero_grad()
    assert teacher_head.weight.grad is None and teacher_head.bias.grad is None
    assert teacher_leaf.grad is None


@backends
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_inputs_are_never_modified(backend, dtype):
    case = make_case(7, 15, 3, dtype=dtype, teacher_dtype=torch.float32, seed=37)
    student = case.student.clone().requires_grad_(True)
    teacher, target = case.teacher.clone(), case.target.clone().int()
    before = (student.detach().clone(), teacher.clone(), target.clone())
    for reduction in ("mean", "none"):
        loss, stats = fused_moe_kd_loss(student, teacher, target, reduction=reduction, backend=backend,
                                        return_stats=True, temperature=[1.0, 2.0, 4.0])
        loss.sum().backward()
    # Strided views of the inputs: a backend that copies must copy, not write through.
    loss = fused_moe_kd_loss(student[:, 2:], teacher[..., 2:], target, backend=backend)
    loss.backward()
    for got, want in zip((student.detach(), teacher, target), before):
        assert torch.equal(got, want) and got.dtype == want.dtype


# ---------------------------------------------------------------------------------
# Numerical contracts found by the property tests
# ---------------------------------------------------------------------------------

@backends
def test_agreement_never_exceeds_one(backend):
    """a = Σ_ℓ r_ℓy is a probability (0 ≤ a ≤ 1). With near-certain experts (large β)
    r_ℓy ≈ w_ℓ and G is a float32 sum formed in another order than the u_ℓy, so the
    rounded Σ_ℓ u_ℓy / G would land on 1 + 1 ulp for several of these 64 rows if the
    agreement were not formed from the target's u and the rest (docs/math.md, Numerics)."""
    g = torch.Generator().manual_seed(0)
    student = 0.3 * torch.randn(64, 8, generator=g)
    teacher = 0.3 * torch.randn(3, 64, 8, generator=g)
    target = torch.randint(0, 8, (64,), generator=g)
    for num_levels in (1, 3):
        for beta in (31.0, 50.0):
            _, stats = fused_moe_kd_loss(student, teacher[:num_levels].squeeze(0), target, expert_strength=beta,
                                         temperature=0.875, reduction="none", backend=backend, return_stats=True)
            a = stats.agreement
            assert (a >= 0).all() and (a <= 1).all(), \
                f"L={num_levels} β={beta}: agreement {a[a > 1].tolist()} > 1"


# ---------------------------------------------------------------------------------
# Bad arguments not already in tests/test_options.py
# ---------------------------------------------------------------------------------

BAD_EXTRA = [
    # (description, call-kwargs builder, error, text the message must contain)
    ("teacher with zero levels", lambda s, t, y: dict(teacher_logits=torch.empty(0, *s.shape)),
     ValueError, "teacher_logits"),
    ("complex teacher", lambda s, t, y: dict(teacher_logits=t.to(torch.complex64)), TypeError, "teacher_logits"),
    ("target as a list", lambda s, t, y: dict(target=y.tolist()), TypeError, "target"),
    ("NaN level weight", lambda s, t, y: dict(level_weights=[NAN]), ValueError, "level_weights"),
    ("inf level weight", lambda s, t, y: dict(level_weights=[INF]), ValueError, "level_weights"),
    ("level weights as a string", lambda s, t, y: dict(level_weights="uniform"), TypeError, "level_weights"),
    ("2-element tensor temperature for 3 levels",
     lambda s, t, y: dict(teacher_logits=torch.stack([t, t, t]), temperature=torch.tensor([1.0, 2.0])),
     ValueError, "temperature"),
    ("complex temperature", lambda s, t, y: dict(temperature=torch.tensor(1j)), TypeError, "temperature"),
    ("bool expert strength", lambda s, t, y: dict(expert_strength=True), TypeError, "expert_strength"),
    ("NaN gate weight", lambda s, t, y: dict(gate_weight=NAN), ValueError, "gate_weight"),
    ("string expert weight", lambda s, t, y: dict(expert_weight="1"), TypeError, "expert_weight"),
    ("float ignore_index", lambda s, t, y: dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ("None reduction", lambda s, t, y: dict(reduction=None), ValueError, "reduction"),
    ("backend of wrong type", lambda s, t, y: dict(backend=0), ValueError, "backend"),
]


@pytest.mark.parametrize("description, make, error, name", BAD_EXTRA, ids=[b[0] for b in BAD_EXTRA])
def test_more_bad_arguments_name_the_argument(description, make, error, name):
    g = torch.Generator().manual_seed(39)
    args = {"student_logits": torch.randn(4, 5, generator=g), "teacher_logits": torch.randn(4, 5, generator=g),
            "target": torch.tensor([0, 1, 4, -100])}
    args.update(make(args["student_logits"], args["teacher_logits"], args["target"]))
    with pytest.raises(error, match=name):
        fused_moe_kd_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("target"), **args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_kernel_backends_refuse_float64_students_by_name(backend):
    """float64 is the reference's job ("auto" routes it there); asking a kernel for it
    is a TypeError naming student_logits, not a silent downcast."""
    s = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="student_logits"):
        fused_moe_kd_loss(s, s, torch.tensor([0, 1, 2]), backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_kernel_backends_explain_too_many_levels_or_accept_them(backend):
    """A kernel with a level limit (the registry's max_levels) refuses L = limit + 1 with a
    ValueError naming teacher_logits, the L given and the limit, and is right at the limit;
    a kernel without one must simply be right at L = 9."""
    limit = REGISTRY[backend].max_levels
    if limit is None:
        check_backend(backend, make_case(3, 6, 9, seed=40, ignore_frac=0.0))
        return
    case = make_case(3, 6, limit + 1, seed=40, ignore_frac=0.0)
    with pytest.raises(ValueError, match=rf"teacher_logits has L={limit + 1} levels.*'{backend}' supports at most {limit}\b"):
        fused_moe_kd_loss(case.student, case.teacher, case.target, backend=backend)
    check_backend(backend, make_case(3, 6, limit, seed=40, ignore_frac=0.0))
