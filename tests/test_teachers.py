"""TopKTeacher: a stored top-k teacher equals the dense call with the teacher it stands for.

The dense teacher is built here from the issue's definition (not with the package's
``to_dense``), and the float64 oracle evaluates the dense call.
"""

import math
import os

import pytest
import torch

from moekd_kernels import MoEKDLoss, TopKTeacher, fused_moe_kd_loss
from moekd_kernels.backends import BACKENDS
from oracle import Case, float64_oracle

TOP_K_BACKENDS = ("reference", "cpu", "triton")


@pytest.fixture(params=TOP_K_BACKENDS)
def backend(request):
    """A backend that takes a TopKTeacher. Only its table entry saying it does not skips;
    one that says it does but cannot run here skips too, except under CI, which fails it."""
    name = request.param
    if not BACKENDS[name].top_k_teacher:
        pytest.skip(f"backends.BACKENDS[{name!r}].top_k_teacher is False")
    reason = BACKENDS[name].unavailable_reason("cpu")
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"backend {name!r} declares top_k_teacher=True but cannot run: {reason}")
        pytest.skip(reason)
    return name


def densify(indices, values, kind, num_classes):
    """−inf everywhere but the listed values (logits), or log(ρ / (C − K′)) there (logprobs)."""
    values = values.double()
    out = torch.empty(values.shape[:-1] + (num_classes,), dtype=torch.float64)
    flat_i, flat_v, flat_out = indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1]), \
        out.reshape(-1, num_classes)
    for row in range(flat_out.shape[0]):
        listed = [(int(i), float(v)) for i, v in zip(flat_i[row], flat_v[row]) if v != -math.inf]
        if kind == "logits":
            rest = -math.inf
        else:
            rho = max(1.0 - math.fsum(math.exp(v) for _, v in listed), 0.0)
            unlisted = num_classes - len(listed)
            rest = math.log(rho / unlisted) if rho > 0 and unlisted > 0 else -math.inf
        flat_out[row] = rest
        for i, v in listed:
            flat_out[row, i] = v
    return out


def top_k(logits, k, kind):
    """The top-k of dense logits, as logits or as log-probabilities of the full softmax."""
    values, indices = logits.topk(k, dim=-1)
    if kind == "logprobs":
        values = torch.log_softmax(logits.double(), dim=-1).gather(-1, indices).to(logits.dtype)
    return indices, values


def check_against_oracle(student, teacher, target, tol_loss, tol_grad, backend, **options):
    dense = densify(teacher.indices, teacher.values, teacher.kind, student.shape[-1])
    levels = max([len(v) for v in options.values() if isinstance(v, (list, tuple))], default=1)
    if dense.dim() == student.dim() and levels > 1:  # one head at several temperatures
        dense = dense.expand(levels, *dense.shape)
    s = student.detach().clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(s, teacher, target, reduction="none", return_stats=True, backend=backend,
                                    **options)
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(loss.dtype))
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(Case(student.double(), dense, target, options))
    exp_grad = (exp_grad * grad_out.reshape(-1, 1)).reshape(student.shape)
    for name, got, want in (("loss", loss, exp_loss), ("log_likelihood", stats.log_likelihood, exp_ll),
                            ("agreement", stats.agreement, exp_agree)):
        got, want = got.detach().double().reshape(-1), want.double().reshape(-1)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        finite = torch.isfinite(want)
        err = (got - want)[finite].abs() / want[finite].abs().clamp_min(1e-3)
        assert err.numel() == 0 or float(err.max()) <= tol_loss, f"{name}: {float(err.max()):.3g}"
    # Element by element: one wrong element fails. tol_grad of the element itself (its
    # rounding to the student's dtype), plus float32 headroom of the row's largest element.
    got = s.grad.double()
    bound = tol_grad * exp_grad.abs() + 2 ** -20 * exp_grad.abs().amax(-1, keepdim=True)
    assert bool(((got - exp_grad).abs() <= bound).all()), float(((got - exp_grad).abs() / bound).max())
    assert s.grad.dtype == student.dtype


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("k", [1, 4, 13])
def test_equals_the_densified_teacher_float32(kind, k, backend):
    g = torch.Generator().manual_seed(k)
    student = 3 * torch.randn(9, 13, generator=g)
    target = torch.randint(0, 13, (9,), generator=g)
    target[[1, 6]] = -100
    indices, values = top_k(3 * torch.randn(9, 13, generator=g), k, kind)
    # float32 rounding of the sums of exponentials: ~1e-6 relative.
    check_against_oracle(student, TopKTeacher(indices, values, kind), target, 1e-5, 1e-5, backend,
                         temperature=2.0, expert_strength=1.5)


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
def test_bfloat16_student_and_values(kind, backend):
    g = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(2, 5, 40, generator=g)).bfloat16()
    target = torch.randint(0, 40, (2, 5), generator=g)
    indices, values = top_k((3 * torch.randn(2, 5, 40, generator=g)).bfloat16(), 8, kind)
    # Loss and stats are float32 sums of exactly representable inputs; the gradient is
    # rounded once to bfloat16: within one ulp, 2^-7 of the element.
    check_against_oracle(student, TopKTeacher(indices, values, kind), target, 1e-5, 2 ** -7, backend)


def test_padding_entries_are_unlisted_classes(backend):
    g = torch.Generator().manual_seed(4)
    student = 3 * torch.randn(6, 10, generator=g)
    target = torch.randint(0, 10, (6,), generator=g)
    indices, values = top_k(3 * torch.randn(6, 10, generator=g), 5, "logprobs")
    values[0, 2:] = -math.inf             # a row that lists 2 classes
    values[3, 4] = -math.inf
    indices[0, 2:] = indices[0, 0]         # padding may repeat any index: it is never read
    for kind in ("logits", "logprobs"):
        check_against_oracle(student, TopKTeacher(indices, values, kind), target, 1e-5, 1e-5, backend)


def test_no_mass_left_gives_the_renormalised_top_k(backend):
    """ρ = 0: log-probs of a distribution over the K listed classes alone."""
    g = torch.Generator().manual_seed(6)
    student = 3 * torch.randn(5, 12, generator=g)
    target = torch.randint(0, 12, (5,), generator=g)
    indices = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(5)])
    # Listed mass a hair above 1, as rounding leaves it: ρ clamps to exactly 0.
    values = (torch.log_softmax(3 * torch.randn(5, 4, generator=g, dtype=torch.float64), -1) + 1e-6).float()
    teacher = TopKTeacher(indices, values, "logprobs")
    check_against_oracle(student, teacher, target, 1e-5, 1e-5, backend, temperature=4.0)
    # Then the gate is softmax(values / τ) over the listed classes: the truncated teacher.
    as_logits = fused_moe_kd_loss(student, TopKTeacher(indices, values, "logits"), target,
                                  temperature=4.0, reduction="none", backend=backend)
    assert torch.allclose(fused_moe_kd_loss(student, teacher, target, temperature=4.0, reduction="none",
                                            backend=backend),
                          as_logits, rtol=1e-6)


def test_two_levels_with_different_class_sets_and_a_shared_head(backend):
    g = torch.Generator().manual_seed(7)
    student = 3 * torch.randn(7, 11, generator=g)
    target = torch.randint(0, 11, (7,), generator=g)
    target[2] = -100
    i1, v1 = top_k(3 * torch.randn(7, 11, generator=g), 3, "logits")
    i2, v2 = top_k(3 * torch.randn(7, 11, generator=g), 3, "logits")
    two = TopKTeacher(torch.stack([i1, i2]), torch.stack([v1, v2]), "logits")
    check_against_oracle(student, two, target, 1e-5, 1e-5, backend, temperature=[1.0, 3.0],
                         level_weights=[1.0, 2.0])
    shared = fused_moe_kd_loss(student, TopKTeacher(i1, v1), target, temperature=(1.0, 3.0), backend=backend)
    stacked = fused_moe_kd_loss(student, TopKTeacher(torch.stack([i1, i1]), torch.stack([v1, v1])), target,
                                temperature=(1.0, 3.0), backend=backend)
    assert torch.equal(shared, stacked)


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
def test_beta_zero_and_no_expert_term_on_every_backend(kind, backend):
    g = torch.Generator().manual_seed(12)
    student = 3 * torch.randn(6, 9, generator=g)
    target = torch.randint(0, 9, (6,), generator=g)
    indices, values = top_k(3 * torch.randn(6, 9, generator=g), 3, kind)
    check_against_oracle(student, TopKTeacher(indices, values, kind), target, 1e-5, 1e-5, backend,
                         expert_strength=0.0, expert_weight=0.0, temperature=2.0)


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("k", [1, 37, 1500])
def test_rows_longer_than_the_kernels_blocks(kind, k, backend):
    """C = 1500 spans two of the CPU kernel's 1024-class summation blocks, and K = C lists
    every class; a (B, T, K) teacher at two levels of one head (level stride 0)."""
    g = torch.Generator().manual_seed(k)
    C = 1500
    student = 4 * torch.randn(2, 3, C, generator=g)
    target = torch.randint(0, C, (2, 3), generator=g)
    target[1, 0] = -100
    indices, values = top_k(4 * torch.randn(2, 3, C, generator=g), k, kind)
    values[0, 1, max(1, k // 2):] = -math.inf  # a padded row (K = 1 keeps its one entry)
    check_against_oracle(student, TopKTeacher(indices, values, kind), target, 1e-5, 1e-5, backend,
                         temperature=[1.0, 2.5], expert_strength=[2.0, 0.5])


def test_beta_zero_is_classic_top_k_kd():
    """β = 0, λ_e = 0: the gradient of KL(π_topk ‖ q) · τ², written with torch.nn.functional."""
    g = torch.Generator().manual_seed(8)
    student = (3 * torch.randn(6, 9, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, 9, (6,), generator=g)
    indices, values = top_k(3 * torch.randn(6, 9, generator=g, dtype=torch.float64), 3, "logits")
    loss = fused_moe_kd_loss(student, TopKTeacher(indices, values), target, expert_strength=0.0,
                             expert_weight=0.0, temperature=2.0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    pi = torch.zeros(6, 9, dtype=torch.float64).scatter(1, indices, torch.softmax(values / 2.0, -1))
    log_q = torch.log_softmax(student / 2.0, -1)
    kl = 4.0 * torch.nn.functional.kl_div(log_q, pi, reduction="sum")
    (expected,) = torch.autograd.grad(kl, student)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-14)


def test_module_form_and_inputs_unmodified():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(4, 8, generator=g)
    target = torch.randint(0, 8, (4,), generator=g)
    indices, values = top_k(torch.randn(4, 8, generator=g), 3, "logprobs")
    before = (indices.clone(), values.clone())
    teacher = TopKTeacher(indices, values, "logprobs")
    assert torch.equal(MoEKDLoss()(student, teacher, target), fused_moe_kd_loss(student, teacher, target))
    assert torch.equal(indices, before[0]) and torch.equal(values, before[1])
    with torch.no_grad():
        assert torch.isfinite(fused_moe_kd_loss(student.requires_grad_(), teacher, target))


@pytest.mark.parametrize("make, message", [
    (lambda: TopKTeacher(torch.zeros(2, 3), torch.zeros(2, 3)), "indices must be an integer tensor"),
    (lambda: TopKTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
     "values must be a floating tensor"),
    (lambda: TopKTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4)), "must have one shape"),
    (lambda: TopKTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), kind="probs"),
     "kind must be one of"),
])
def test_bad_teacher_is_rejected_at_construction(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


@pytest.mark.parametrize("indices, message", [
    (torch.tensor([[0, 1, 2, 3, 4, 5]]), r"K=6 classes per row, more than the student's C=5"),
    (torch.tensor([[0, 5]]), r"indices must be in \[0, 5\), got 5"),
    (torch.tensor([[-1, 2]]), r"indices must be in \[0, 5\), got -1"),
    (torch.tensor([[3, 3]]), "distinct within a row, got class 3 twice"),
])
def test_bad_indices_are_rejected_before_the_loss(indices, message):
    values = torch.zeros(indices.shape)
    with pytest.raises(ValueError, match=message):
        fused_moe_kd_loss(torch.randn(1, 5), TopKTeacher(indices, values), torch.tensor([0]))


def test_shape_mismatch_with_the_student_names_the_shapes():
    teacher = TopKTeacher(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"TopKTeacher indices must have shape \(4, 'K'\)"):
        fused_moe_kd_loss(torch.randn(4, 5), teacher, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", [n for n, b in BACKENDS.items() if not b.top_k_teacher])
def test_backends_without_top_k_say_so(name):
    teacher = TopKTeacher(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=f"backend='{name}' does not take a TopKTeacher"):
        fused_moe_kd_loss(torch.randn(2, 5), teacher, torch.zeros(2, dtype=torch.long), backend=name)


def test_to_dense_matches_the_definition():
    g = torch.Generator().manual_seed(10)
    indices, values = top_k(torch.randn(3, 2, 7, generator=g), 3, "logprobs")
    values[0, 1, 2] = -math.inf
    for kind in ("logits", "logprobs"):
        teacher = TopKTeacher(indices, values, kind)
        assert torch.allclose(teacher.to_dense(7).double(), densify(indices, values, kind, 7), rtol=1e-6)
