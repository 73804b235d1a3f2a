"""The fused C++/OpenMP backend ("cpu") against the float64 oracle and the identities of
docs/math.md."""

import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import requires
from moekd_kernels import cpu_backend, fused_moe_kd_loss
from moekd_kernels.backends import BACKENDS, auto_backend, resolve_backend
from moekd_kernels.options import flatten_inputs, resolve_options
from oracle import check_backend, classic_kd, float64_oracle, kernel_options, make_case, rel_err

reason = cpu_backend.unavailable_reason("cpu")
pytestmark = requires("backend 'cpu'", reason)

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _run(student, teacher, target, reduction="none", **options):
    """Loss and gradient (∂ loss.sum() / ∂ student) through the public API."""
    student = student.detach().clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, teacher, target, reduction=reduction, backend="cpu", **options)
    loss.sum().backward()
    return loss.detach(), student.grad


# ---- the oracle, across sizes, levels and dtypes ------------------------------------

@pytest.mark.parametrize("num_classes, num_rows", [(1, 6), (2, 9), (127, 8), (1000, 6), (4099, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_oracle(num_classes, num_rows, dtype):
    check_backend("cpu", make_case(num_rows, num_classes, 1, dtype=dtype, seed=num_classes))


def test_matches_oracle_at_131073_classes():
    """Long rows: blocked float/double sums keep float32 within 1e-5."""
    errs = check_backend("cpu", make_case(3, 131073, 2, seed=4, ignore_frac=0.0,
                                          temperature=[1.5, 5.0], expert_strength=[1.0, 4.0]))
    assert max(errs.values()) <= 1e-6


@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_levels_with_their_own_hyper_parameters(num_levels, dtype):
    case = make_case(7, 53, num_levels, dtype=dtype, seed=10 + num_levels,
                     temperature=[0.7, 2.0, 6.0][:num_levels],
                     expert_strength=[0.0, 1.5, 9.0][:num_levels],
                     level_weights=[1.0, 3.0, 0.5][:num_levels],
                     gate_weight=0.6, expert_weight=1.3)
    check_backend("cpu", case)


@pytest.mark.parametrize("student_dtype, teacher_dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float64),   # float64 teachers are read as is
])
def test_teacher_dtype_may_differ(student_dtype, teacher_dtype):
    check_backend("cpu", make_case(6, 300, 2, dtype=student_dtype, teacher_dtype=teacher_dtype, seed=3))


@pytest.mark.parametrize("beta", [20.0, 50.0])
def test_saturated_experts_stay_accurate(beta):
    """At large β the expert terms cancel (r_y → 1); the kernel regroups them."""
    check_backend("cpu", make_case(12, 200, 2, seed=8, expert_strength=beta, gate_weight=0.05))


def test_leading_dims_are_flattened():
    check_backend("cpu", make_case(0, 37, 2, lead_shape=(2, 3, 4), seed=6))


# ---- gradients: dtype, scaling by grad_output, reductions ---------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_comes_back_in_the_student_dtype(dtype):
    case = make_case(4, 33, 1, dtype=dtype, teacher_dtype=torch.float32)
    loss, grad = _run(case.student, case.teacher, case.target, reduction="mean")
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.is_contiguous()
    # Each row's gradient sums to zero (docs/math.md, gradient), up to the output rounding.
    assert grad.float().sum(-1).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_mean_reduction_and_scaled_loss():
    case = make_case(10, 64, 2, seed=2, ignore_frac=0.3)
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, case.teacher, case.target, backend="cpu")
    (2 * loss).backward()
    ref_student = case.student.clone().requires_grad_(True)
    ref = fused_moe_kd_loss(ref_student, case.teacher, case.target, backend="reference")
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(student.grad, 2 * ref_student.grad) <= 1e-5


def _options(num_levels, **options):
    return kernel_options(num_levels, **options)


@pytest.mark.parametrize("scale", [1 / 7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_classes, num_levels", [(1, 1), (53, 3), (1000, 2)])
def test_grad_scale_multiplies_the_gradient_only(scale, dtype, num_classes, num_levels):
    """forward(..., grad_scale=w): grad = w · ∂loss/∂s (the mean reduction's 1/n folded into
    the kernel); loss and stats unscaled; ignored rows exactly 0."""
    options = dict(temperature=[0.7, 2.0, 6.0][:num_levels], expert_strength=[0.5, 1.5, 9.0][:num_levels],
                   gate_weight=0.6, expert_weight=1.3)
    case = make_case(9, num_classes, num_levels, dtype=dtype, seed=num_classes, ignore_frac=0.3, **options)
    case.target[2] = -100
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    w = torch.tensor(scale, dtype=torch.float32)
    loss, ll, agreement, grad = cpu_backend.forward(s, t, y, _options(num_levels, **options), grad_scale=w)
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert grad.dtype == dtype
    assert rel_err(grad, exp_grad * float(w)) <= tol
    for got, want in ((loss, exp_loss), (ll, exp_ll), (agreement, exp_agree)):
        assert rel_err(got, want) <= tol
    assert (grad[y == -100] == 0).all()


def test_grad_scale_is_applied_in_float_before_the_rounding():
    """A bf16 student whose values a float32 student shares gives the same float gradient;
    the bf16 one must be that, times w, rounded once: not the rounded gradient times w."""
    case = make_case(6, 203, 2, dtype=torch.bfloat16, teacher_dtype=torch.float32, seed=21)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts, w = _options(2), torch.tensor(1 / 7)
    *_, grad16 = cpu_backend.forward(s, t, y, opts, grad_scale=w)
    *_, grad32 = cpu_backend.forward(s.float(), t, y, opts, grad_scale=w)
    *_, unscaled16 = cpu_backend.forward(s, t, y, opts)
    assert torch.equal(grad16, grad32.to(torch.bfloat16))
    assert not torch.equal(grad16, (unscaled16.float() * w).to(torch.bfloat16))


def test_grad_scale_edge_values():
    """w = 1 is the unscaled gradient bit for bit; rows whose target is ignored stay 0 and
    out-of-range rows NaN whatever w is (inf, the 1/0 of a batch with no valid row)."""
    case = make_case(6, 40, 1, seed=14, ignore_frac=0.0)
    target = case.target.clone()
    target[1], target[4] = -100, 40
    s, t, y = flatten_inputs(case.student, case.teacher, target)
    opts = _options(1)
    plain = cpu_backend.forward(s, t, y, opts)
    one = cpu_backend.forward(s, t, y, opts, grad_scale=torch.tensor(1.0))
    for a, b in zip(plain, one):  # NaN in row 4: equal_nan
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    *_, grad_inf = cpu_backend.forward(s, t, y, opts, grad_scale=torch.tensor(math.inf))
    assert (grad_inf[1] == 0).all() and grad_inf[4].isnan().all()
    all_ignored = torch.full_like(y, -100)
    *_, grad = cpu_backend.forward(s, t, all_ignored, opts, grad_scale=torch.tensor(math.inf))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_all_rows_ignored():
    case = make_case(5, 40, 2, ignore_frac=1.0)
    for reduction in ("mean", "sum", "none"):
        loss, grad = _run(case.student, case.teacher, case.target, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_ignored_rows_are_zero_and_do_not_touch_the_rest():
    case = make_case(9, 50, 1, ignore_frac=0.0, ignore_index=7, seed=1)
    target = case.target.clone()
    target[::3] = 7
    loss, grad = _run(case.student, case.teacher, target, ignore_index=7)
    assert (loss[::3] == 0).all() and (grad[::3] == 0).all()
    keep = torch.arange(9) % 3 != 0
    loss_kept, grad_kept = _run(case.student[keep], case.teacher[keep], target[keep], ignore_index=7)
    assert torch.equal(loss[keep], loss_kept) and torch.equal(grad[keep], grad_kept)


def test_empty_batch():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = fused_moe_kd_loss(student, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 5)


# ---- layouts -------------------------------------------------------------------------

def _same_as_contiguous(student, teacher, target, **options):
    loss, grad = _run(student, teacher, target, **options)
    loss_c, grad_c = _run(student.contiguous(), teacher.contiguous(), target.contiguous(), **options)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)


def test_row_strided_inputs_are_read_in_place():
    """Slices of wider tensors (stride(-1) == 1) are read through their row stride, no copy."""
    wide_s = 3 * torch.randn(6, 130, generator=torch.Generator().manual_seed(0))
    wide_t = 3 * torch.randn(2, 6, 2, 130, generator=torch.Generator().manual_seed(1))
    student, teacher = wide_s[:, 3:103], wide_t[:, :, 1, 5:105]    # teacher (L, N, C), strided levels too
    target = torch.randint(0, 100, (6,), generator=torch.Generator().manual_seed(2))
    _same_as_contiguous(student, teacher, target, temperature=[2.0, 3.0])
    s2, t3, y1 = flatten_inputs(student, teacher, target)
    opts = resolve_options(2, temperature=2.0, expert_strength=2.0, level_weights=None, gate_weight=1.0,
                           expert_weight=1.0, ignore_index=-100)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpu_backend.forward(s2, t3, y1, opts)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies == [], copies


def test_class_strided_inputs():
    """stride(-1) != 1 (a transposed layout) is copied, with the same results."""
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(40, 8, generator=g)).t()           # (8, 40), stride (1, 8)
    teacher = (3 * torch.randn(2, 40, 8, generator=g)).transpose(1, 2)
    target = torch.randint(0, 40, (8,), generator=g)
    _same_as_contiguous(student, teacher, target)


def test_teacher_levels_made_by_indexing():
    g = torch.Generator().manual_seed(4)
    student = 3 * torch.randn(5, 30, generator=g)
    all_levels = 3 * torch.randn(4, 5, 30, generator=g)
    target = torch.randint(0, 30, (5,), generator=g)
    for teacher in (all_levels[::2], all_levels[1:3], all_levels[2], all_levels[[3, 0]]):
        _same_as_contiguous(student, teacher, target)
    # A teacher broadcast over rows (stride 0) is read as it is.
    one_row = all_levels[:, :1].expand(4, 5, 30)
    _same_as_contiguous(student, one_row, target)


def test_inputs_are_not_modified():
    case = make_case(6, 77, 2, dtype=torch.bfloat16, seed=9)
    before = [t.clone() for t in (case.student, case.teacher, case.target)]
    _run(case.student, case.teacher, case.target)
    for old, new in zip(before, (case.student, case.teacher, case.target)):
        assert torch.equal(old, new)


def test_int32_targets():
    case = make_case(6, 20, 1, seed=12)
    loss, grad = _run(case.student, case.teacher, case.target)
    loss32, grad32 = _run(case.student, case.teacher, case.target.int())
    assert torch.equal(loss, loss32) and torch.equal(grad, grad32)


def test_thread_count_does_not_change_results():
    """Each row is computed by one thread in a fixed order: results are bitwise stable."""
    case = make_case(16, 500, 2, seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(case.student, case.teacher, case.target)
        torch.set_num_threads(max(2, threads))
        many = _run(case.student, case.teacher, case.target)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ---- special values ------------------------------------------------------------------

def test_masked_classes_give_no_nan():
    case = make_case(6, 10, 2, seed=2, ignore_frac=0.0)
    student, teacher, target = case.student.clone(), case.teacher.clone(), case.target.clone()
    student[:, 3] = float("-inf")      # masked in both: no contribution
    teacher[:, :, 3] = float("-inf")
    teacher[:, :, 5] = float("-inf")   # masked in the teacher only
    target[target == 3] = 4
    loss, grad = _run(student, teacher, target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, 3] == 0).all()
    ref_loss = fused_moe_kd_loss(student, teacher, target, reduction="none", backend="reference")
    assert rel_err(loss, ref_loss) <= 1e-5
    check_backend("cpu", type(case)(student, teacher, target, {}))


def test_teacher_mass_on_a_class_the_student_masks_gives_inf():
    student = torch.tensor([[0.0, float("-inf"), 1.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0]])
    loss, grad = _run(student, teacher, torch.tensor([0]))
    ref = fused_moe_kd_loss(student, teacher, torch.tensor([0]), reduction="none", backend="reference")
    assert loss.item() == math.inf == ref.item() and torch.isfinite(grad).all()


def test_nan_propagates_to_its_row_only():
    case = make_case(4, 16, 1, seed=5, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    student[1, 7] = float("nan")
    teacher[2, 3] = float("nan")
    loss, grad = _run(student, teacher, case.target)
    assert loss[1].isnan() and grad[1].isnan().all()
    assert loss[2].isnan() and grad[2].isnan().all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_out_of_range_target_gives_nan_row_not_a_bad_read():
    """The Python layer rejects these on CPU; the kernel itself still never reads out of bounds."""
    case = make_case(3, 8, 1, seed=6, ignore_frac=0.0)
    target = case.target.clone()
    target[0], target[2] = 8, -3
    s, t, y = flatten_inputs(case.student, case.teacher, target)
    opts = resolve_options(1, temperature=4.0, expert_strength=2.0, level_weights=None, gate_weight=1.0,
                           expert_weight=1.0, ignore_index=-100)
    loss, ll, agreement, grad = cpu_backend.forward(s, t, y, opts)
    for row in (0, 2):
        assert loss[row].isnan() and ll[row].isnan() and agreement[row].isnan() and grad[row].isnan().all()
    assert torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all()


# ---- identities (docs/math.md, identities) ---------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_beta_zero_is_classic_kd(tau):
    case = make_case(12, 300, 1, seed=7, ignore_frac=0.25)
    lam_g, lam_e = 0.9, 0.1
    loss, grad = _run(case.student, case.teacher, case.target, reduction="sum", temperature=tau,
                      expert_strength=0.0, gate_weight=lam_g, expert_weight=lam_e)
    kd_student = case.student.clone().requires_grad_(True)
    kd = classic_kd(kd_student, case.teacher, case.target, temperature=tau, gate_weight=lam_g,
                    expert_weight=lam_e, reduction="sum")
    kd.backward()
    pi = F.softmax(case.teacher.double() / tau, dim=-1)
    entropy = -(pi * pi.log()).sum(-1)
    constant = (lam_g * tau ** 2 * entropy)[case.target != -100].sum()
    assert rel_err(loss, kd.double() + constant) <= 1e-5
    assert rel_err(grad, kd_student.grad) <= 1e-5


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_identity(epsilon):
    case = make_case(10, 257, 1, seed=11, ignore_frac=0.2)
    constant_teacher = torch.full_like(case.teacher, 0.37)
    loss, grad = _run(case.student, constant_teacher, case.target, reduction="mean", temperature=1.0,
                      expert_strength=0.0, gate_weight=epsilon, expert_weight=1.0 - epsilon)
    ref_student = case.student.clone().requires_grad_(True)
    expected = F.cross_entropy(ref_student, case.target, label_smoothing=epsilon)
    expected.backward()
    assert rel_err(loss, expected) <= 1e-5
    assert rel_err(grad, ref_student.grad) <= 1e-5


# ---- errors, registration, build ------------------------------------------------------

def test_auto_uses_the_cpu_kernel_for_cpu_tensors():
    assert auto_backend("cpu") == "cpu"
    case = make_case(4, 30, 1)
    assert torch.equal(fused_moe_kd_loss(case.student, case.teacher, case.target),
                       fused_moe_kd_loss(case.student, case.teacher, case.target, backend="cpu"))


def test_more_than_eight_levels_is_a_clear_error():
    case = make_case(2, 5, 9)
    with pytest.raises(ValueError, match="teacher_logits.*L=9.*at most 8"):
        fused_moe_kd_loss(case.student, case.teacher, case.target, backend="cpu")
    check_backend("cpu", make_case(2, 5, 8, seed=1))  # eight is fine


def test_float64_student_is_a_type_error():
    case = make_case(2, 5, 1, dtype=torch.float64)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = resolve_options(1, temperature=4.0, expert_strength=2.0, level_weights=None, gate_weight=1.0,
                           expert_weight=1.0, ignore_index=-100)
    with pytest.raises(TypeError, match="student_logits"):
        cpu_backend.forward(s, t, y, opts)
    with pytest.raises(TypeError, match="student_logits"):
        fused_moe_kd_loss(case.student, case.teacher, case.target, backend="cpu")


def test_other_devices_are_refused():
    assert "cpu" in cpu_backend.unavailable_reason("cuda")


def test_exp_and_log_match_libm():
    """The kernel's own exp (x <= 0) and log (x >= 1), at float32 arguments, against libm."""
    ext = cpu_backend.EXTENSION.require("cpu")
    xs = (-87.0 * torch.linspace(0, 1, 6001) ** 2).tolist()            # float32 values, exactly
    worst = max(abs(ext.exp_for_test(x) - math.exp(x)) / math.exp(x) for x in xs)
    assert worst <= 3e-7   # ~3 ulp
    assert ext.exp_for_test(float("-inf")) == 0.0 and ext.exp_for_test(-200.0) == 0.0
    assert math.isnan(ext.exp_for_test(float("nan")))
    ys = [y for y in torch.cat([1 + torch.logspace(-7, 0, 3000), torch.logspace(0.2, 38, 3000)]).tolist() if y > 1]
    worst = max(abs(ext.log_for_test(y) - math.log(y)) / math.log(y) for y in ys)
    assert worst <= 4e-7
    assert ext.log_for_test(1.0) == 0.0 and ext.log_for_test(float("inf")) == math.inf
    assert math.isnan(ext.log_for_test(float("nan")))


def test_a_failed_build_is_reported(tmp_path):
    """A compile error becomes the reason string; the working build is untouched."""
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "common").mkdir()
    for rel in cpu_backend._SOURCES + cpu_backend._HEADERS:
        (csrc / rel).write_text("#error moekd_kernels test: this compiler refuses\n")
    with pytest.raises(Exception) as info:
        cpu_backend._build(csrc, tmp_path / "build", name="moekd_cpu_broken")
    message = cpu_backend._KERNEL.failure_message(info.value)
    assert "could not be built" in message and "this compiler refuses" in message


def test_unavailable_kernel_falls_back_under_auto_and_raises_when_named(monkeypatch):
    monkeypatch.setattr(cpu_backend.EXTENSION, "module", None)
    monkeypatch.setattr(cpu_backend.EXTENSION, "failure", "the C++ CPU kernel could not be built: no compiler")
    assert BACKENDS["cpu"].unavailable_reason("cpu").endswith("no compiler")
    with pytest.raises(RuntimeError, match="no compiler"):
        resolve_backend("cpu", torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="falls back to 'reference'.*no compiler"):
        assert auto_backend.__wrapped__("cpu") == "reference"


def test_first_build_prints_one_line(tmp_path):
    """A fresh cache builds (one line on stderr); the next process imports it silently."""
    script = textwrap.dedent("""
        import torch
        from moekd_kernels import cpu_backend
        assert cpu_backend.unavailable_reason("cpu") is None, cpu_backend.unavailable_reason("cpu")
    """)
    env = {**__import__("os").environ, "MOEKD_KERNELS_CACHE": str(tmp_path)}
    # Reuse this process's build instead of compiling again: copy it into the fresh cache.
    import shutil

    built = cpu_backend.build_dir()
    shutil.copytree(built, tmp_path / built.name, ignore=shutil.ignore_patterns("lock"))
    (tmp_path / built.name / "sources.sha256").unlink()   # as if the sources had changed
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("moekd_kernels: building the C++ CPU kernel") == 1
    assert re.search(r"moekd_kernels: built the C\+\+ CPU kernel in \d+ s", first.stderr), first.stderr
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "building" not in second.stderr


# ---- need_grad=False: no gradient pass, no gradient buffer ------------------------------

def _bitwise_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype, teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float64),
                                                  (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("num_classes, num_levels", [(1, 1), (53, 3), (2500, 2)])
def test_without_grad_loss_and_stats_are_the_same_bits(dtype, teacher_dtype, num_classes, num_levels):
    case = make_case(9, num_classes, num_levels, dtype=dtype, teacher_dtype=teacher_dtype, seed=num_classes,
                     ignore_frac=0.3, temperature=[0.7, 2.0, 6.0][:num_levels],
                     expert_strength=[0.5, 30.0, 2.0][:num_levels])
    target = case.target.clone()
    target[1], target[4] = -100, num_classes   # an ignored and an out-of-range row too
    s, t, y = flatten_inputs(case.student, case.teacher, target)
    opts = _options(num_levels, temperature=[0.7, 2.0, 6.0][:num_levels],
                    expert_strength=[0.5, 30.0, 2.0][:num_levels])
    with_grad = cpu_backend.forward(s, t, y, opts, grad_scale=torch.tensor(0.25))
    without = cpu_backend.forward(s, t, y, opts, grad_scale=torch.tensor(0.25), need_grad=False)
    assert with_grad[3] is not None and without[3] is None
    for got, want in zip(without[:3], with_grad[:3]):
        assert _bitwise_equal(got, want)
    assert torch.isnan(without[0][4]) and without[0][1] == 0


# One process per measurement: the peak RSS of a process (VmHWM) only grows, so it is
# reset through /proc/self/clear_refs after a warm-up call of the same shape.
_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from moekd_kernels import cpu_backend
    from moekd_kernels.options import resolve_options

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    need_grad = sys.argv[1] == "grad"
    N, C = 1024, 32768
    g = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(N, C, generator=g), 3 * torch.randn(1, N, C, generator=g)
    target = torch.randint(0, C, (N,), generator=g)
    opts = resolve_options(1, temperature=4.0, expert_strength=2.0, level_weights=None, gate_weight=1.0,
                           expert_weight=1.0, ignore_index=-100)
    out = cpu_backend.forward(student, teacher, target, opts, need_grad=need_grad)   # warm-up
    del out
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    out = cpu_backend.forward(student, teacher, target, opts, need_grad=need_grad)
    print((status("VmHWM:") - before) / (N * C * 4))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux only)")
def test_without_grad_peak_memory_is_far_below_one_gradient_buffer():
    """N=1024, C=32768 float32, in a fresh process: without a gradient the call adds less
    than a quarter of an N×C float32 buffer to the peak RSS; with one, at least the
    gradient itself (which shows the measurement sees such a buffer)."""
    def extra_buffers(mode):
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return float(proc.stdout.split()[-1])

    without, with_grad = extra_buffers("nograd"), extra_buffers("grad")
    assert without < 0.25, f"need_grad=False added {without:.3f} N×C float32 buffers to the peak RSS"
    assert with_grad >= 0.9, f"need_grad=True added only {with_grad:.3f} buffers: the measurement misses it"


# ---- one teacher head at several temperatures (level stride 0) --------------------------

@pytest.mark.parametrize("class_strided", [False, True])
def test_teacher_shared_by_levels_is_read_in_place(class_strided):
    """teacher_2d.unsqueeze(0).expand(L, N, C) gives the bits of the stacked teacher, and is
    read without a copy (a class-strided head is copied once, not L times)."""
    case = make_case(7, 1500, 1, seed=33, ignore_frac=0.2)
    head = case.teacher.t().contiguous().t() if class_strided else case.teacher
    shared = head.unsqueeze(0).expand(3, -1, -1)
    assert shared.stride(0) == 0
    opts = _options(3, temperature=[1.0, 2.0, 4.0], expert_strength=[0.5, 2.0, 8.0])
    s, _, y = flatten_inputs(case.student, case.teacher, case.target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = cpu_backend.forward(s, shared, y, opts)
    copied = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_"]
    assert copied == ([[7, 1500]] if class_strided else []), copied
    want = cpu_backend.forward(s, shared.contiguous(), y, opts)
    for a, b in zip(got, want):
        assert _bitwise_equal(a, b)


# ---- a top-k teacher, loaded row by row into the kernel's scratch ------------------------

def _dense_of(rows, num_classes):
    """The dense (L, N, C) teacher a TopKRows stands for, in the dtype the kernel reads it in."""
    dtype = torch.float64 if rows.values.dtype == torch.float64 else torch.float32
    dense = rows.rest.to(dtype)[..., None].expand(*rows.rest.shape, num_classes + 1).clone()
    listed = ~torch.isneginf(rows.values)
    index = torch.where(listed, rows.indices, num_classes)  # padding lands in a spare column
    return dense.scatter(-1, index, rows.values.to(dtype))[..., :num_classes]


@pytest.mark.parametrize("dtype, values_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float64), (torch.float32, torch.float16)])
@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("num_classes, k, num_levels", [(1, 1, 1), (53, 53, 2), (2500, 40, 3), (1500, 7, 1)])
def test_top_k_teacher_equals_its_dense_teacher(dtype, values_dtype, kind, num_classes, k, num_levels):
    """The top-k loader fills the scratch row of exponentials that the dense loader would
    (its sum formed in double, not in float blocks): the same results to float32 rounding,
    for every values dtype, one head shared by the levels (level stride 0), padding, and
    indices and values read through non-unit strides."""
    from moekd_kernels.teachers import TopKTeacher, topk_rows

    g = torch.Generator().manual_seed(num_classes + k)
    N = 9
    student = (3 * torch.randn(N, num_classes, generator=g)).to(dtype)
    target = torch.randint(0, num_classes, (N,), generator=g)
    target[4] = -100
    logits = 3 * torch.randn(N, num_classes, generator=g, dtype=torch.float64)
    values, indices = logits.topk(k, dim=-1)
    if kind == "logprobs":
        values = torch.log_softmax(logits, -1).gather(-1, indices)
    values = values.to(values_dtype)
    values[2, 1:] = -math.inf
    # Non-unit strides over K: every other column of a twice-as-wide buffer.
    wide_i = torch.zeros(N, 2 * k, dtype=torch.long)
    wide_v = torch.zeros(N, 2 * k, dtype=values_dtype)
    wide_i[:, ::2], wide_v[:, ::2] = indices, values
    rows = topk_rows(TopKTeacher(wide_i[:, ::2], wide_v[:, ::2], kind), 1, num_levels, N, num_classes)
    assert rows.indices.stride(-1) == 2 and (num_levels == 1 or rows.values.stride(0) == 0)
    opts = _options(num_levels, temperature=[1.0, 2.0, 4.0][:num_levels],
                    expert_strength=[0.5, 2.0, 8.0][:num_levels])
    for need_grad in (True, False):
        got = cpu_backend.forward(student, rows, target, opts, torch.tensor(0.25), need_grad)
        want = cpu_backend.forward(student, _dense_of(rows, num_classes), target, opts, torch.tensor(0.25),
                                   need_grad)
        for name, a, b in zip(("loss", "log_likelihood", "agreement", "grad"), got, want):
            if a is None or b is None:
                assert a is None and b is None and name == "grad" and not need_grad
                continue
            assert a.dtype == b.dtype
            a, b = a.double(), b.double()
            # One float32 rounding of Z_t apart: ~1e-7 relative, scaled up by the loss's sums;
            # low-precision gradients may round one ulp apart.
            rel = 2e-6 if name != "grad" or dtype == torch.float32 else 2 ** -7
            bound = rel * b.abs() + 1e-6 * b.abs().amax(-1, keepdim=True)
            assert bool(((a - b).abs() <= bound).all()), (name, float(((a - b).abs() / bound).max()))


def test_top_k_binding_checks_its_tensors():
    ext = cpu_backend.EXTENSION.require("cpu")
    student, target = torch.randn(3, 8), torch.zeros(3, dtype=torch.long)
    indices, values, rest = torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2), torch.zeros(1, 3)
    options = ([4.0], [2.0], [1.0], 1.0, 1.0, -100, 1, 1.0, True)
    for args, message in (
        ((student, indices, values[..., :1], rest), "top-k values must be shaped like the indices"),
        ((student, indices.int(), values, rest), "top-k indices must be int64"),
        ((student, indices, values, rest[:, :2]), r"top-k rest must be \(L, N\)"),
        ((student, indices[:, :2], values[:, :2], rest[:, :2]), "top-k indices must have 3 rows"),
        ((student, indices, values, rest.half()), "top-k rest must be float32 or float64"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            ext.moe_kd_rows_topk(*args, 0, target, *options)
