"""The public API and the autograd glue, exercised through the reference backend."""

import inspect

import pytest
import torch

from moekd_kernels import MoEKDLoss, MoEKDStats, fused_moe_kd_loss
from oracle import DEFAULT_OPTIONS, check_backend, make_case, naive_oracle, rel_err

SPEC_DEFAULTS = {**DEFAULT_OPTIONS, "reduction": "mean", "backend": "auto", "return_stats": False}


def test_signature_and_defaults_match_between_functional_and_module():
    functional = inspect.signature(fused_moe_kd_loss).parameters
    assert list(functional)[:3] == ["student_logits", "teacher_logits", "target"]
    assert {k: p.default for k, p in functional.items() if k in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert all(functional[k].kind is inspect.Parameter.KEYWORD_ONLY for k in SPEC_DEFAULTS)
    module = inspect.signature(MoEKDLoss.__init__).parameters
    assert {k: p.default for k, p in module.items() if k != "self"} == SPEC_DEFAULTS
    assert list(inspect.signature(MoEKDLoss.forward).parameters)[1:] == [
        "student_logits", "teacher_logits", "target"]


def test_module_equals_functional():
    case = make_case(6, 9, 2, seed=4)
    options = dict(temperature=[2.0, 3.0], expert_strength=1.5, level_weights=[1.0, 2.0],
                   gate_weight=0.5, expert_weight=0.8)
    module = MoEKDLoss(**options, return_stats=True)
    loss_m, stats_m = module(case.student, case.teacher, case.target)
    loss_f, stats_f = fused_moe_kd_loss(case.student, case.teacher, case.target, **options,
                                        return_stats=True)
    assert torch.equal(loss_m, loss_f) and torch.equal(stats_m.agreement, stats_f.agreement)
    assert "backend=auto (cpu: " in repr(module)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_batch_time_class_inputs(num_levels):
    case = make_case(0, 7, num_levels, dtype=torch.float64, seed=num_levels, lead_shape=(2, 3),
                     temperature=2.0)
    errs = check_backend("reference", case, tol=1e-9)
    assert max(errs.values()) <= 1e-9


def test_stats_are_detached_named_tuple_shaped_like_target():
    case = make_case(0, 5, 1, seed=0, lead_shape=(2, 4))
    student = case.student.clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, return_stats=True)
    assert isinstance(stats, MoEKDStats) and stats._fields == ("log_likelihood", "agreement")
    for field in stats:
        assert field.shape == (2, 4) and field.dtype == torch.float32 and not field.requires_grad
    ignored = case.target == -100
    assert (stats.agreement[ignored] == 0).all() and (stats.log_likelihood[ignored] == 0).all()
    assert ((stats.agreement >= 0) & (stats.agreement <= 1)).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_grad(reduction):
    student = torch.randn(4, 6, requires_grad=True)
    target = torch.full((4,), -100)
    loss = fused_moe_kd_loss(student, torch.randn(4, 6), target, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (student.grad == 0).all()


def test_empty_batch():
    student = torch.randn(0, 6, requires_grad=True)
    loss = fused_moe_kd_loss(student, torch.randn(0, 6), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and student.grad.shape == (0, 6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_scales_the_gradient(reduction):
    case = make_case(8, 11, 1, dtype=torch.float64, seed=9)
    grads = []
    for scale in (1.0, 2.0):
        student = case.student.clone().requires_grad_(True)
        (scale * fused_moe_kd_loss(student, case.teacher, case.target, reduction=reduction)).backward()
        grads.append(student.grad)
    assert rel_err(grads[1], 2 * grads[0]) <= 1e-15


def test_per_row_grad_output_with_reduction_none():
    case = make_case(5, 7, 1, dtype=torch.float64, seed=2, ignore_frac=0.0)
    weights = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    student = case.student.clone().requires_grad_(True)
    fused_moe_kd_loss(student, case.teacher, case.target, reduction="none").backward(weights)
    _, grad, _, _ = naive_oracle(case)
    assert rel_err(student.grad, grad * weights[:, None]) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_in_logits_dtype_and_loss_in_float32(dtype):
    case = make_case(4, 9, 2, dtype=dtype, teacher_dtype=torch.float32, seed=1)
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, case.teacher, case.target, backend="reference")
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == dtype


def test_teacher_gets_no_gradient_and_inputs_are_untouched():
    case = make_case(6, 8, 2, seed=3)
    student = case.student.clone().requires_grad_(True)
    teacher = case.teacher.clone().requires_grad_(True)
    before = (student.detach().clone(), teacher.detach().clone(), case.target.clone())
    fused_moe_kd_loss(student, teacher, case.target).backward()
    assert teacher.grad is None
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher.detach(), before[1])
    assert torch.equal(case.target, before[2])


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_second_backward_through_the_same_loss_raises(factor):
    student = torch.randn(3, 4, requires_grad=True)
    loss = factor * fused_moe_kd_loss(student, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_explicit_unavailable_backend_says_why():
    from moekd_kernels.backends import BACKENDS

    reason = BACKENDS["cuda"].unavailable_reason("cpu")
    assert reason is not None
    with pytest.raises(RuntimeError, match="not available"):
        fused_moe_kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


def test_float64_auto_uses_the_reference():
    case = make_case(4, 6, 1, dtype=torch.float64, seed=8)
    loss = fused_moe_kd_loss(case.student, case.teacher, case.target, reduction="none")
    exp_loss, _, _, _ = naive_oracle(case)
    assert rel_err(loss, exp_loss) <= 1e-12
