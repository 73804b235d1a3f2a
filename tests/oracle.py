"""Float64 oracles and the conformance check every backend's tests share.

Nothing here calls the package's math: the oracles read the options themselves
(``Problem``) and evaluate the math of docs/math.md in plain float64 torch, so a bug in the package
cannot hide by being on both sides of a comparison.

- ``naive_oracle`` builds all L·C experts as full softmaxes, forms the mixture
  literally, takes responsibilities from it and gets the M-step gradient by autograd
  with r detached. O(L·N·C²): small C only.
- ``closed_form_oracle`` is docs/math.md, Definitions in log space (u, G, r from log π, β and
  log D = log1p(expm1(β) σ)), O(L·N·C), with the gradient again by autograd through
  the M-step objective with r detached (so it checks docs/math.md, Gradient rather than restating it).
  ``test_closed_form_oracle_equals_the_naive_mixture`` holds the two together at 1e-10.
  Working in log space it also stays exact where the naive mixture underflows
  (log p(y) < −745, a logit gap of ~1e3) or is 0/0 (a masked target).

``check_outputs`` is the conformance check; see ``check_gradient`` for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from moekd_kernels import fused_moe_kd_loss
from moekd_kernels.benchmarking import TOLERANCE, rel_err as _rel_err  # noqa: F401 - TOLERANCE is re-exported

OPTION_NAMES = ("temperature", "expert_strength", "level_weights", "gate_weight",
                "expert_weight", "ignore_index")

# The package defaults (docs/math.md, API): the one copy the tests use.
DEFAULT_OPTIONS = {"temperature": 4.0, "expert_strength": 2.0, "level_weights": None,
                   "gate_weight": 1.0, "expert_weight": 1.0, "ignore_index": -100}

# Loss and stats are accumulated in float32 from inputs that are exact in float32 whatever
# their dtype (every bf16/fp16 value is a float32 value), and they are returned in float32:
# so they owe float32 accuracy for every input dtype. 1e-5 normwise is ~80 float32 ulps,
# room for the sums over C classes and L levels.
STATS_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}

# Gradient model (``check_gradient``): the float64 gradient rounded once to the output
# dtype, each element within ULPS[dtype] of it, plus HEADROOM[dtype] × the row's scale for
# elements formed as differences of larger float32 terms. The row's scale is its largest
# |gradient|, or the size of the terms (``term_scale``) where they cancel further: a
# single-class row's gradient is exactly 0 as a difference of terms of size λ_e + λ_g τ.
# - 16-bit outputs: a correctly rounded store of a float32 result that is good to a few
#   float32 ulps lands within 1 ulp of the rounded exact value; 2^-20 of the row max is
#   8 float32 ulps of the largest term.
# - float32 outputs: no second rounding to hide behind, and the sums over C classes add a
#   few ulps per element, so the bound is 1e-5 relative per element (the old normwise
#   bound, now for every element) plus the same 2^-20 headroom.
# - float64 (the reference): 1e-9 relative.
ULPS = {torch.bfloat16: 1.0, torch.float16: 1.0}
GRAD_RELATIVE = {torch.float32: 1e-5, torch.float64: 1e-9}
HEADROOM = {torch.float64: 1e-9, torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -20,
            torch.float16: 2.0 ** -20}
# Rounding bias: mean of (|actual| − |rounded|)/ulp over well-conditioned elements (|g| above
# 2^-10 of the row max and 2^-14 of the row's scale), "rounded" being the float64 value
# rounded to nearest. A correct store gives ~0 (it differs from "rounded" only where the
# float32 error crosses a rounding boundary, either way); truncation gives about −0.5.
MAX_BIAS_ULPS = 0.1
MIN_BIAS_ELEMENTS = 200        # distinct values: enough that a few boundary crossings stay within ±0.1


@dataclass
class Case:
    student: torch.Tensor          # (..., C)
    teacher: torch.Tensor          # (..., C) or (L, ..., C)
    target: torch.Tensor           # (...)
    options: Dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Options and inputs, read independently of moekd_kernels.options
# ---------------------------------------------------------------------------------

def _floats(value) -> List[float]:
    if torch.is_tensor(value):
        return [float(v) for v in value.reshape(-1)]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


@dataclass
class Problem:
    """A case flattened to float64 rows with per-level options spelled out."""

    student: torch.Tensor        # (N, C) float64
    teacher: torch.Tensor        # (L, N, C) float64
    target: torch.Tensor         # (N,) int64
    valid: torch.Tensor          # (N,) bool: target != ignore_index
    taus: List[float]
    betas: List[float]
    weights: List[float]         # normalised to sum 1
    gate_weight: float
    expert_weight: float


def problem(case: Case) -> Problem:
    opts = {**DEFAULT_OPTIONS, **case.options}
    num_classes = case.student.shape[-1]
    s = case.student.detach().cpu().double().reshape(-1, num_classes)
    num_rows = s.shape[0]
    teacher = case.teacher.detach().cpu().double()
    per_level = [len(_floats(opts[k])) for k in ("temperature", "expert_strength")]
    if opts["level_weights"] is not None:
        per_level.append(len(_floats(opts["level_weights"])))
    if teacher.dim() == case.student.dim():
        # One head at several temperatures (docs/math.md, Extensions): the same logits at every level.
        teacher = teacher.unsqueeze(0).expand(max(per_level), *teacher.shape)
    teacher = teacher.reshape(teacher.shape[0], num_rows, num_classes)
    num_levels = teacher.shape[0]

    def spread(name):
        values = _floats(opts[name])
        return values * num_levels if len(values) == 1 else values

    weights = spread("level_weights") if opts["level_weights"] is not None else [1.0] * num_levels
    weights = [w / sum(weights) for w in weights]
    # Compared in int64: a value the target's own dtype cannot hold matches no row.
    target = case.target.detach().cpu().reshape(-1).long()
    valid = target != int(opts["ignore_index"])
    return Problem(s, teacher, target, valid, spread("temperature"), spread("expert_strength"),
                   weights, float(opts["gate_weight"]), float(opts["expert_weight"]))


def num_levels(case: Case) -> int:
    return problem(case).teacher.shape[0]


# ---------------------------------------------------------------------------------
# The two oracles: (loss, grad, log_likelihood, agreement), float64, per row
# ---------------------------------------------------------------------------------

def naive_oracle(case: Case):
    """Per row, by the literal mixture of L·C materialised experts."""
    p = problem(case)
    num_rows, num_classes = p.student.shape
    loss = torch.zeros(num_rows, dtype=torch.float64)
    ll = torch.zeros(num_rows, dtype=torch.float64)
    agreement = torch.zeros(num_rows, dtype=torch.float64)
    grad = torch.zeros(num_rows, num_classes, dtype=torch.float64)
    eye = torch.eye(num_classes, dtype=torch.float64)
    for n in range(num_rows):
        if not p.valid[n]:
            continue
        y = int(p.target[n])
        s = p.student[n].clone().requires_grad_(True)
        log_p_y, joint = [], []
        for level, (tau, beta, w) in enumerate(zip(p.taus, p.betas, p.weights)):
            pi = torch.softmax(p.teacher[level, n] / tau, dim=0)
            experts = torch.log_softmax(s[None, :] + beta * eye, dim=1)  # row c = expert c
            log_p_y.append(experts[:, y])
            joint.append(w * pi * experts[:, y].detach().exp())
        joint = torch.stack(joint)                     # (L, C)
        r = joint / joint.sum()
        ll[n] = joint.sum().log()
        agreement[n] = r[:, y].sum()
        expert_ll = (r * torch.stack(log_p_y)).sum()
        gate = 0.0
        for level, tau in enumerate(p.taus):
            log_q = torch.log_softmax(s / tau, dim=0)
            gate = gate + tau ** 2 * torch.where(r[level] == 0, 0.0, r[level] * log_q).sum()
        row_loss = 0.0
        if p.expert_weight != 0:
            row_loss = row_loss - p.expert_weight * expert_ll
        if p.gate_weight != 0:
            row_loss = row_loss - p.gate_weight * gate
        if not torch.is_tensor(row_loss):
            continue
        loss[n] = row_loss.detach()
        (grad[n],) = torch.autograd.grad(row_loss, s)
    return loss, grad, ll, agreement


def _weighted(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """r·x with 0·(±inf) = 0: a class the posterior gives no weight contributes nothing."""
    return torch.where(r == 0, torch.zeros_like(x), r * x)


def closed_form_oracle(case: Case):
    """All rows at once, by docs/math.md, Definitions in log space; gradient by autograd with r fixed."""
    p = problem(case)
    num_rows, num_classes = p.student.shape
    loss = torch.zeros(num_rows, dtype=torch.float64)
    ll = torch.zeros(num_rows, dtype=torch.float64)
    agreement = torch.zeros(num_rows, dtype=torch.float64)
    grad = torch.zeros(num_rows, num_classes, dtype=torch.float64)
    rows = p.valid.nonzero().reshape(-1)
    if rows.numel() == 0 or num_classes == 0:
        return loss, grad, ll, agreement
    s = p.student[rows].clone().requires_grad_(True)
    t = p.teacher[:, rows]
    y = p.target[rows]
    is_y = F.one_hot(y, num_classes).bool()                        # (n, C)
    at_y = is_y.double()                                           # [c = y], as float64
    log_sigma = torch.log_softmax(s, dim=-1)
    log_sigma_y = log_sigma.gather(1, y[:, None]).squeeze(1)       # (n,)
    sigma = log_sigma.exp()

    log_u, log_d = [], []
    for level, (tau, beta, w) in enumerate(zip(p.taus, p.betas, p.weights)):
        log_pi = torch.log_softmax(t[level] / tau, dim=-1)
        log_d.append(torch.log1p(math.expm1(beta) * sigma))         # log D_ℓc
        log_w = math.log(w) if w > 0 else -math.inf
        log_u.append(log_w + log_pi + beta * at_y - log_d[-1].detach())
    log_u = torch.stack(log_u)                                      # (L, n, C)
    log_g = torch.logsumexp(log_u.permute(1, 0, 2).reshape(len(rows), -1), dim=-1)
    r = (log_u - log_g[None, :, None]).exp()                       # detached: the E-step

    expert_ll = 0.0
    gate = 0.0
    for level, (tau, beta) in enumerate(zip(p.taus, p.betas)):
        log_p_y = log_sigma_y[:, None] + beta * at_y - log_d[level]  # log p_ℓc(y)
        expert_ll = expert_ll + _weighted(r[level], log_p_y).sum(-1)
        gate = gate + tau ** 2 * _weighted(r[level], torch.log_softmax(s / tau, dim=-1)).sum(-1)
    row_loss = torch.zeros(len(rows), dtype=torch.float64)
    if p.expert_weight != 0:
        row_loss = row_loss - p.expert_weight * expert_ll
    if p.gate_weight != 0:
        row_loss = row_loss - p.gate_weight * gate
    if row_loss.requires_grad:
        (grad[rows],) = torch.autograd.grad(row_loss.sum(), s)
    loss[rows] = row_loss.detach()
    ll[rows] = (log_sigma_y + log_g).detach()
    agreement[rows] = r.permute(1, 0, 2)[is_y[:, None, :].expand(-1, r.shape[0], -1)] \
        .reshape(len(rows), -1).sum(-1)
    return loss, grad, ll, agreement


def float64_oracle(case: Case):
    """The naive mixture where it is affordable, the closed form beyond."""
    p = problem(case)
    num_levels_, num_rows, num_classes = p.teacher.shape
    if num_rows * num_levels_ * num_classes * num_classes <= 2_000_000:
        return naive_oracle(case)
    return closed_form_oracle(case)


# ---------------------------------------------------------------------------------
# Comparing results with the oracle
# ---------------------------------------------------------------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over finite entries; non-finite entries must match."""
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    finite = torch.isfinite(e)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    assert torch.equal(e[~finite].isnan(), a[~finite].isnan()), "NaN entries differ"
    assert torch.equal(e[~finite & ~e.isnan()], a[~finite & ~a.isnan()]), "infinite entries differ"
    return _rel_err(a, e)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each (float64) value of x: 2^(exponent − mantissa bits),
    never below the smallest subnormal."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    min_exponent = round(math.log2(info.tiny))
    x = x.double().abs()
    _, exponent = torch.frexp(x)                                   # |x| = m·2^e, m in [0.5, 1)
    exponent = torch.where(x == 0, min_exponent, torch.clamp(exponent.double() - 1, min=min_exponent))
    return torch.exp2(exponent - mantissa_bits)


def term_scale(case: Case) -> torch.Tensor:
    """Per row, a bound on the terms each gradient element is a difference of (docs/math.md, Gradient):
    λ_e (σ_j A + σ_j r_j expm1(β)/D_j + [j = y]) ≤ 2 λ_e and λ_g Σ_ℓ τ_ℓ (R_ℓ q_ℓj + r_ℓj)
    ≤ 2 λ_g max τ. 0 at ignored rows."""
    p = problem(case)
    scale = 2 * p.expert_weight + 2 * p.gate_weight * max(p.taus, default=0.0)
    return torch.where(p.valid, scale, 0.0).double()


def check_gradient(name: str, actual: torch.Tensor, expected: torch.Tensor,
                    headroom: Optional[torch.Tensor] = None, grad_output: Optional[torch.Tensor] = None) -> None:
    """Element by element: ``actual`` (the backend's gradient, in its dtype) against the
    float64 ``expected`` rounded once to that dtype; see ULPS/HEADROOM above. For 16-bit
    outputs also the rounding bias. ``headroom`` (per row, absolute) is the row's scale
    where it exceeds the row's largest |gradient| (``term_scale`` times grad_output).

    ``grad_output`` (per row): a factor autograd applies after the gradient was stored in
    its dtype (the op computes the gradient in the forward pass and backward scales it,
    in float32): ``expected`` is then the unscaled gradient, and the reference value is
    the float64 gradient rounded, times the factor in float32, rounded again."""
    dtype = actual.dtype
    num_classes = actual.shape[-1] if actual.dim() else 1
    a = actual.detach().cpu().double().reshape(-1, max(num_classes, 1))
    e = expected.detach().cpu().double().reshape(a.shape)
    if grad_output is not None:
        # The factor is applied in the accumulation dtype: float64 for float64 gradients.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        factor = grad_output.detach().cpu().to(acc).reshape(-1, 1)
        twice_rounded = (e.to(dtype).to(acc) * factor).to(dtype).double()
        e = e * factor.double()
    else:
        twice_rounded = None
    finite = torch.isfinite(e)
    assert torch.equal(finite, torch.isfinite(a)), f"{name}: non-finite entries differ"
    assert torch.equal(e.isnan(), a.isnan()), f"{name}: NaN entries differ"
    assert torch.equal(a[~finite & ~a.isnan()], e[~finite & ~e.isnan()]), f"{name}: infinite entries differ"
    if a.numel() == 0:
        return
    e = torch.where(finite, e, 0.0)
    a = torch.where(finite, a, 0.0)
    row_max = e.abs().amax(-1, keepdim=True)
    scale = row_max if headroom is None else torch.maximum(row_max, headroom.double().reshape(-1, 1))
    slack = HEADROOM[dtype] * scale
    rounded = e.to(dtype).double() if twice_rounded is None else torch.where(finite, twice_rounded, 0.0)
    if dtype in ULPS:
        bound = ULPS[dtype] * ulp(rounded, dtype) + slack
    else:
        bound = GRAD_RELATIVE[dtype] * e.abs() + slack
    err = (a - rounded).abs()
    bad = err > bound
    if bad.any():
        rows, cols = bad.nonzero(as_tuple=True)
        worst = int((err - bound).reshape(-1).argmax())
        r, c = divmod(worst, a.shape[1])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} gradient elements off ({dtype}); worst at "
            f"[{r}, {c}]: got {a[r, c].item():.9g}, float64 {e[r, c].item():.9g} "
            f"(rounded {rounded[r, c].item():.9g}), error {err[r, c].item():.3g} > bound "
            f"{bound[r, c].item():.3g}; first bad elements {list(zip(rows[:5].tolist(), cols[:5].tolist()))}")
    if dtype in ULPS:
        # Well-conditioned: well above the row's largest value's rounding and above the
        # float32 error of the terms (a row whose gradient is all cancellation has none).
        well_conditioned = (e.abs() > 2.0 ** -10 * row_max) & (e.abs() > 2.0 ** -14 * scale)
        exact = e[well_conditioned]
        # Against the correctly rounded value, not the exact one: structured values (ties,
        # integer logits) round unevenly even when rounded right, so measured against the
        # exact value a correct store could look biased; against the rounded one it is ~0.
        signed = ((a.abs() - rounded.abs()) / ulp(rounded, dtype))[well_conditioned]
        # One sample per distinct exact value: logits with ties (integer logits, a shared
        # teacher) repeat gradient values, and their equal rounding errors are one sample.
        values, inverse = torch.unique(exact, return_inverse=True)
        first = torch.full((len(values),), len(exact), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(exact)), "amin")
        signed = signed[first]
        if len(signed) >= MIN_BIAS_ELEMENTS:
            bias = float(signed.mean())
            assert abs(bias) <= MAX_BIAS_ULPS, (
                f"{name}: gradient rounding is biased: mean (|got| − |correctly rounded|) = {bias:+.3f} ulp "
                f"of {dtype} over {len(signed)} distinct elements (round-to-nearest gives ~0, truncation −0.5)")


def check_outputs(label: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                  input_dtype: torch.dtype, tol: Optional[float] = None,
                  grad_scale: Optional[torch.Tensor] = None,
                  grad_output: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The conformance check. ``got`` and ``expected`` are (loss, grad, log_likelihood,
    agreement) per row; expected is float64 (the gradient times any factor the kernel
    applied, but not ``grad_output``: see ``check_gradient``).

    Loss and stats: normwise relative error within STATS_TOLERANCE (float32 for every
    input dtype), non-finite entries equal. Gradient: ``check_gradient``, element by
    element, with ``grad_scale`` (per row: ``term_scale`` times grad_output) as the
    cancellation scale. ``tol`` replaces the loss/stats bound (and, for float64, the
    gradient's).
    Returns the normwise relative errors, for reports.
    """
    loss, grad, ll, agreement = got
    exp_loss, exp_grad, exp_ll, exp_agree = expected
    stats_tol = STATS_TOLERANCE[input_dtype] if tol is None else tol
    scaled = exp_grad if grad_output is None else exp_grad * grad_output.double().reshape(-1, 1)
    errs = {"loss": rel_err(loss, exp_loss), "log_likelihood": rel_err(ll, exp_ll),
            "agreement": rel_err(agreement, exp_agree), "grad": rel_err(grad, scaled)}
    for name in ("loss", "log_likelihood", "agreement"):
        assert errs[name] <= stats_tol, f"{label} {name}: rel err {errs[name]:.3g} > {stats_tol:g} ({input_dtype})"
    if tol is not None and grad.dtype == torch.float64:
        assert errs["grad"] <= tol, f"{label} grad: rel err {errs['grad']:.3g} > {tol:g}"
    check_gradient(f"{label} grad", grad, exp_grad, grad_scale, grad_output)
    return errs


def check_backend(backend: str, case: Case, tol: Optional[float] = None,
                  seed: int = 0) -> Dict[str, float]:
    """Run ``backend`` on ``case`` through the public API (reduction="none", a random
    per-row grad_output) and hold loss, stats and gradient to the float64 oracle with
    ``check_outputs``. Returns the normwise relative errors."""
    student = case.student.detach().clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, reduction="none",
                                    backend=backend, return_stats=True, **case.options)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = (torch.rand(case.target.shape, generator=g, dtype=torch.float64) + 0.5)
    loss.backward(grad_out.to(loss.device, loss.dtype))
    assert student.grad.dtype == case.student.dtype
    assert loss.shape == case.target.shape and stats.agreement.shape == case.target.shape

    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    # grad_out went in as the loss dtype, and scales the stored gradient (check_gradient).
    factor = grad_out.to(loss.dtype).reshape(-1)
    num_classes = case.student.shape[-1]
    return check_outputs(backend, (loss, student.grad.reshape(-1, num_classes), stats.log_likelihood,
                                   stats.agreement),
                         (exp_loss, exp_grad, exp_ll, exp_agree), case.student.dtype, tol,
                         term_scale(case) * factor.double(), grad_output=factor)


def make_case(num_rows: int, num_classes: int, num_levels: int = 1, *, dtype=torch.float32,
              teacher_dtype=None, device="cpu", seed: int = 0, ignore_frac: float = 0.2,
              lead_shape=None, **options) -> Case:
    """Fresh random logits (scale ~3) and labels; about ``ignore_frac`` rows ignored."""
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead_shape) if lead_shape is not None else (num_rows,)
    student = (3 * torch.randn(*lead, num_classes, generator=g)).to(dtype)
    teacher_shape = lead + (num_classes,) if num_levels == 1 else (num_levels,) + lead + (num_classes,)
    teacher = (3 * torch.randn(*teacher_shape, generator=g)).to(teacher_dtype or dtype)
    target = torch.randint(0, num_classes, lead, generator=g)
    ignore_index = options.get("ignore_index", -100)
    target[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    return Case(student.to(device), teacher.to(device), target.to(device), dict(options))


def kernel_options(num_levels: int, **options):
    """The package's resolved options for calling a backend's ``forward`` directly
    (backend-level tests): DEFAULT_OPTIONS overridden by ``options``."""
    from moekd_kernels.options import resolve_options
    return resolve_options(num_levels, **{**DEFAULT_OPTIONS, **options})


def classic_kd(student, teacher, target, *, temperature, gate_weight, expert_weight,
               ignore_index=-100, reduction="none"):
    """λ_e·CE(s, y) + λ_g·τ²·KL(π ‖ q) per row, from torch.nn.functional.

    The tests' own copy, independent of moekd_kernels.benchmarking.eager_classic_kd."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_pi = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, log_pi, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(student, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    rows = expert_weight * ce + gate_weight * temperature ** 2 * torch.where(valid, kl, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1)
