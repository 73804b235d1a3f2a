"""The tests' own float64 oracles (tests/oracle.py) agree with each other and with the
identities of docs/math.md, and the conformance check fails on one bad element or a biased rounding."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from oracle import (Case, check_gradient, closed_form_oracle, classic_kd, make_case, naive_oracle,
                    rel_err, ulp)


def _random_case(seed: int) -> Case:
    rng = random.Random(seed)
    num_levels, num_classes = rng.randint(1, 3), rng.randint(1, 24)
    per_level = lambda lo, hi: [rng.uniform(lo, hi) for _ in range(num_levels)]  # noqa: E731
    options = {
        "temperature": per_level(0.25, 8.0) if num_levels > 1 else rng.choice([1.0, rng.uniform(0.25, 8.0)]),
        "expert_strength": rng.choice([0.0, 2.0, rng.uniform(0.0, 12.0)]),
        "gate_weight": rng.choice([0.0, 1.0, rng.uniform(0.0, 2.0)]),
        "expert_weight": rng.choice([0.0, 1.0, rng.uniform(0.0, 2.0)]),
        "ignore_index": rng.choice([-100, 2]),
    }
    if num_levels > 1 and rng.random() < 0.6:
        options["level_weights"] = [rng.choice([0.0, rng.uniform(0.1, 3.0)]) for _ in range(num_levels)]
        options["level_weights"][0] = 1.0
    case = make_case(rng.randint(1, 9), num_classes, num_levels, dtype=torch.float64, seed=seed,
                     ignore_frac=0.25, **options)
    case.student = case.student * rng.choice([0.3, 1.0, 4.0])
    if rng.random() < 0.3:                       # −inf masks in the teacher and the student
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(case.student.shape, generator=g) < 0.3
        mask[..., 0] = False
        case.teacher = case.teacher.masked_fill(mask, -math.inf)
        target = case.target.clamp(0, num_classes - 1)
        mask = mask.scatter(-1, target[..., None], False)
        case.student = case.student.masked_fill(mask, -math.inf)
    return case


@pytest.mark.parametrize("seed", range(40))
def test_closed_form_oracle_equals_the_naive_mixture(seed):
    case = _random_case(seed)
    naive = naive_oracle(case)
    closed = closed_form_oracle(case)
    # Element by element; 1e-11 absolute for values that are float64 roundoff of zero.
    for name, a, b in zip(("loss", "grad", "log_likelihood", "agreement"), closed, naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name} {case.options}: {m}")


def test_closed_form_oracle_is_exact_where_the_mixture_underflows():
    """A logit gap of 2000: the literal mixture's p(y) is 0 in float64, the log-space form
    is not. With β = 0 the loss is classic KD plus λ_g τ² H(π) (docs/math.md, Identities)."""
    s = torch.tensor([[0.0, 2000.0, -5.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    loss, grad, ll, agreement = closed_form_oracle(Case(s, t, y, {"expert_strength": 0.0}))
    s_var = s.clone().requires_grad_(True)
    kd = classic_kd(s_var, t, y, temperature=4.0, gate_weight=1.0, expert_weight=1.0)
    pi = F.softmax(t / 4.0, dim=-1)
    entropy = -(pi * pi.log()).sum(-1)
    (kd_grad,) = torch.autograd.grad(kd.sum(), s_var)
    assert rel_err(loss, kd.detach() + 16.0 * entropy) <= 1e-12
    assert rel_err(grad, kd_grad) <= 1e-12
    assert ll.item() == pytest.approx(-2000.0, rel=1e-12)
    assert agreement.item() == pytest.approx(pi[0, 0].item(), rel=1e-12)


def test_ulp_matches_nextafter():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.tensor([1.0, 1.5, 3.0, -0.7, 6e-5, 1e-30, 0.0]).to(dtype)
        x = x[x.isfinite()]
        up = torch.nextafter(x.abs(), torch.full_like(x, math.inf))
        assert torch.equal(ulp(x.double(), dtype), (up.double() - x.abs().double())), dtype


def _gradient_sample(dtype, rounding):
    g = torch.Generator().manual_seed(5)
    exact = torch.randn(8, 400, generator=g, dtype=torch.float64)
    if rounding == "nearest":
        return exact.to(dtype), exact
    # Toward zero: the nearest value, stepped one ulp inward where it rounded outward.
    nearest = exact.to(dtype)
    outward = nearest.double().abs() > exact.abs()
    inward = torch.nextafter(nearest, torch.zeros_like(nearest))
    return torch.where(outward, inward, nearest), exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_check_accepts_nearest_and_rejects_truncation(dtype):
    check_gradient("nearest", *_gradient_sample(dtype, "nearest"))
    with pytest.raises(AssertionError, match="biased"):
        check_gradient("truncated", *_gradient_sample(dtype, "truncate"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_check_fails_on_one_bad_element(dtype):
    got, exact = _gradient_sample(dtype, "nearest")
    got = got.clone()
    got[3, 17] = (exact[3, 17] * (1 + 2.0 ** -5)).to(dtype)            # 8 bf16 ulps, 2^18 float32 ulps
    with pytest.raises(AssertionError, match=r"1 of 3200 gradient elements off"):
        check_gradient("one bad", got, exact)
