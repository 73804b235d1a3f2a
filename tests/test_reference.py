"""The pure-PyTorch reference against the naive float64 oracle and the identities of docs/math.md."""

import random

import pytest
import torch
import torch.nn.functional as F

from moekd_kernels import fused_moe_kd_loss
from moekd_kernels.options import flatten_inputs, resolve_options
from moekd_kernels.reference import reference_forward, reference_loss_autograd
from oracle import DEFAULT_OPTIONS, Case, check_backend, classic_kd, make_case, naive_oracle, rel_err


def random_options(rng: random.Random, num_levels: int) -> dict:
    per_level = lambda lo, hi: [rng.uniform(lo, hi) for _ in range(num_levels)]  # noqa: E731
    options = {
        "temperature": per_level(0.5, 5.0) if num_levels > 1 else rng.uniform(0.5, 5.0),
        "expert_strength": per_level(0.0, 4.0) if num_levels > 1 else rng.uniform(0.0, 4.0),
        "gate_weight": rng.uniform(0.0, 2.0),
        "expert_weight": rng.uniform(0.0, 2.0),
    }
    if num_levels > 1 and rng.random() < 0.7:
        options["level_weights"] = per_level(0.1, 3.0)
    return options


@pytest.mark.parametrize("seed", range(24))
def test_reference_matches_naive_oracle(seed):
    rng = random.Random(seed)
    num_levels, num_classes = rng.randint(1, 3), rng.randint(1, 20)
    case = make_case(rng.randint(1, 9), num_classes, num_levels, dtype=torch.float64, seed=seed,
                     ignore_frac=0.25, **random_options(rng, num_levels))
    errs = check_backend("reference", case, tol=1e-9, seed=seed)
    assert max(errs.values()) <= 1e-9


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(6))
def test_reductions_match_oracle(seed, reduction):
    rng = random.Random(100 + seed)
    num_levels = rng.randint(1, 3)
    case = make_case(8, rng.randint(1, 20), num_levels, dtype=torch.float64, seed=seed,
                     ignore_frac=0.3, **random_options(rng, num_levels))
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, case.teacher, case.target, reduction=reduction,
                             backend="reference", **case.options)
    (2.5 * loss).backward()
    exp_loss, exp_grad, _, _ = naive_oracle(case)
    divisor = max(int((case.target != -100).sum()), 1) if reduction == "mean" else 1
    assert rel_err(loss, exp_loss.sum() / divisor) <= 1e-9
    assert rel_err(student.grad, 2.5 * exp_grad / divisor) <= 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_equals_autograd_equals_oracle(seed):
    rng = random.Random(200 + seed)
    num_levels = rng.randint(1, 3)
    case = make_case(6, 13, num_levels, dtype=torch.float64, seed=seed, **random_options(rng, num_levels))
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = _opts(case, t.shape[0])
    _, _, _, closed_form = reference_forward(s, t, y, opts)
    s_var = s.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(reference_loss_autograd(s_var, t, y, opts).sum(), s_var)
    _, oracle_grad, _, _ = naive_oracle(case)
    assert rel_err(closed_form, autograd) <= 1e-12
    assert rel_err(closed_form, oracle_grad) <= 1e-9


def _opts(case: Case, num_levels: int):
    o = {**DEFAULT_OPTIONS, **case.options}
    return resolve_options(num_levels, **o)


@pytest.mark.parametrize("num_levels", [1, 3])
def test_gradcheck_m_step_objective(num_levels):
    """gradcheck of Q(s | s0): responsibilities frozen at s0, as in the M-step."""
    case = make_case(4, 7, num_levels, dtype=torch.float64, seed=num_levels, expert_strength=1.5,
                     temperature=2.0)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = _opts(case, t.shape[0])
    s0 = s.clone()
    objective = lambda x: reference_loss_autograd(x, t, y, opts, e_step_logits=s0)  # noqa: E731
    assert torch.autograd.gradcheck(objective, (s.clone().requires_grad_(True),))
    # ... and its gradient at s0 is the closed form the backends implement.
    _, _, _, closed_form = reference_forward(s, t, y, opts)
    s_var = s.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(objective(s_var).sum(), s_var)
    assert rel_err(closed_form, autograd) <= 1e-12


def test_gradcheck_through_public_api_at_beta_zero():
    """With β = 0 the responsibilities do not depend on s, so the M-step gradient is
    the true gradient of the loss; gradcheck holds through the whole public path."""
    case = make_case(5, 6, 2, dtype=torch.float64, seed=3, expert_strength=0.0, temperature=[1.5, 3.0])

    def loss_fn(student):
        return fused_moe_kd_loss(student, case.teacher, case.target, backend="reference",
                                 **case.options)

    student = case.student.clone().requires_grad_(True)
    analytic = torch.autograd.grad(loss_fn(student), student)[0]
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    for idx in range(student.numel()):
        bump = torch.zeros(student.numel(), dtype=torch.float64)
        bump[idx] = eps
        bump = bump.view_as(student)
        numeric.view(-1)[idx] = (loss_fn(case.student + bump) - loss_fn(case.student - bump)) / (2 * eps)
    # Central differences in float64: ~1e-9 absolute on O(1) gradients.
    assert torch.allclose(analytic, numeric, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_beta_zero_is_classic_kd(reduction, tau):
    case = make_case(12, 17, 1, dtype=torch.float64, seed=7, ignore_frac=0.25)
    lam_g, lam_e = 0.9, 0.1
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, case.teacher, case.target, temperature=tau, expert_strength=0.0,
                             gate_weight=lam_g, expert_weight=lam_e, reduction=reduction,
                             backend="reference")
    kd_student = case.student.clone().requires_grad_(True)
    kd = classic_kd(kd_student, case.teacher, case.target, temperature=tau, gate_weight=lam_g,
                    expert_weight=lam_e, reduction=reduction)
    # The MoE-KD gate term is a cross-entropy: it exceeds KL(π‖q) by the constant λ_g τ² H(π).
    pi = F.softmax(case.teacher / tau, dim=-1)
    entropy = -(pi * pi.log()).sum(-1)
    valid = case.target != -100
    constant = torch.where(valid, lam_g * tau ** 2 * entropy, 0.0)
    if reduction == "sum":
        constant = constant.sum()
    elif reduction == "mean":
        constant = constant.sum() / valid.sum()
    assert rel_err(loss, kd + constant) <= 1e-10
    loss.sum().backward()
    kd.sum().backward()
    assert rel_err(student.grad, kd_student.grad) <= 1e-10


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_identity(epsilon):
    case = make_case(10, 9, 1, dtype=torch.float64, seed=11, ignore_frac=0.2)
    constant_teacher = torch.full_like(case.teacher, 0.37)
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, constant_teacher, case.target, temperature=1.0, expert_strength=0.0,
                             gate_weight=epsilon, expert_weight=1.0 - epsilon, backend="reference")
    ref_student = case.student.clone().requires_grad_(True)
    expected = F.cross_entropy(ref_student, case.target, label_smoothing=epsilon)
    assert rel_err(loss, expected) <= 1e-10
    loss.backward()
    expected.backward()
    assert rel_err(student.grad, ref_student.grad) <= 1e-10


def test_large_beta_tends_to_gate_cross_entropy():
    case = make_case(8, 12, 1, dtype=torch.float64, seed=5, ignore_frac=0.0)
    tau, lam_g = 2.0, 0.7
    loss, stats = fused_moe_kd_loss(case.student, case.teacher, case.target, temperature=tau,
                                    expert_strength=50.0, gate_weight=lam_g, expert_weight=0.0,
                                    reduction="none", backend="reference", return_stats=True)
    expected = lam_g * tau ** 2 * F.cross_entropy(case.student / tau, case.target, reduction="none")
    assert rel_err(loss, expected) <= 1e-9
    assert torch.allclose(stats.agreement, torch.ones_like(stats.agreement))


def test_masked_classes_give_no_nan():
    case = make_case(6, 10, 2, dtype=torch.float32, seed=2, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    student[:, 3] = float("-inf")          # masked in the student only: teacher mass there → +inf
    teacher[:, :, 3] = float("-inf")       # ... unless the teacher masks it too
    teacher[:, :, 5] = float("-inf")       # masked in the teacher only
    target = case.target.clone()
    target[target == 3] = 4
    student = student.requires_grad_(True)
    loss = fused_moe_kd_loss(student, teacher, target, reduction="none", backend="reference")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert (student.grad[:, 3] == 0).all()


def test_float64_stays_float64_and_low_precision_accumulates_in_float32():
    case = make_case(4, 8, 1, dtype=torch.bfloat16, seed=1)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    loss, ll, agreement, grad = reference_forward(s, t, y, _opts(case, 1))
    assert loss.dtype == ll.dtype == agreement.dtype == torch.float32 and grad.dtype == torch.bfloat16
    loss64, *_, grad64 = reference_forward(s.double(), t.double(), y, _opts(case, 1))
    assert loss64.dtype == torch.float64 and grad64.dtype == torch.float64
    # float32 accumulation: the bf16 result matches float64 on the same (rounded) inputs.
    assert rel_err(loss, loss64) <= 1e-6


@pytest.mark.parametrize("block_elements", [1, 30, 1 << 18])
def test_row_blocks_do_not_change_the_result(monkeypatch, block_elements):
    """The reference computes a block of rows at a time (its memory stays a few blocks);
    rows are independent, so any block size gives the same numbers (up to the order of
    vectorised sums), the oracle's."""
    from moekd_kernels import reference

    case = make_case(7, 10, 2, dtype=torch.float64, seed=31, temperature=[1.0, 3.0])
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = _opts(case, 2)
    whole = reference_forward(s, t, y, opts, torch.tensor(0.5, dtype=torch.float64))
    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", block_elements)
    blocked = reference_forward(s, t, y, opts, torch.tensor(0.5, dtype=torch.float64))
    for a, b in zip(blocked, whole):
        assert rel_err(a, b) <= 1e-15
    exp_loss, exp_grad, _, _ = naive_oracle(case)
    assert rel_err(blocked[0], exp_loss) <= 1e-9 and rel_err(blocked[3], 0.5 * exp_grad) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_without_need_grad_no_gradient_and_the_same_rows(dtype):
    case = make_case(9, 12, 3, dtype=dtype, seed=32)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = _opts(case, 3)
    with_grad = reference_forward(s, t, y, opts)
    loss, ll, agreement, grad = reference_forward(s, t, y, opts, need_grad=False)
    assert grad is None and with_grad[3] is not None
    for a, b in zip((loss, ll, agreement), with_grad[:3]):
        assert torch.equal(a, b)


def test_teacher_levels_of_stride_0_read_in_place():
    """One head at three temperatures: a stride-0 level view equals the stacked copy."""
    case = make_case(6, 8, 1, dtype=torch.float64, seed=33)
    s, t, y = flatten_inputs(case.student, case.teacher, case.target)
    opts = resolve_options(3, temperature=[1.0, 2.0, 5.0], expert_strength=[0.0, 1.0, 3.0], level_weights=None,
                           gate_weight=0.6, expert_weight=1.3, ignore_index=-100)
    view = t[0].unsqueeze(0).expand(3, -1, -1)
    assert view.stride(0) == 0
    for a, b in zip(reference_forward(s, view, y, opts), reference_forward(s, view.contiguous(), y, opts)):
        assert torch.equal(a, b)
