"""Float64 oracles and the conformance check every backend's tests share.

``naive_oracle`` is independent of the package: it builds all L·C experts as full
softmaxes, forms the mixture literally, takes responsibilities from it and gets
the M-step gradient by autograd with r detached. It costs O(L·N·C²), so for
large C the checks fall back to the package reference evaluated in float64,
which test_reference.py holds to the naive oracle at 1e-9.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from moekd_kernels import fused_moe_kd_loss
from moekd_kernels.options import flatten_inputs, resolve_options
from moekd_kernels.reference import reference_forward

OPTION_NAMES = ("temperature", "expert_strength", "level_weights", "gate_weight",
                "expert_weight", "ignore_index")

# Relative error bounds against float64, by the dtype of the student logits.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}


@dataclass
class Case:
    student: torch.Tensor          # (..., C)
    teacher: torch.Tensor          # (..., C) or (L, ..., C)
    target: torch.Tensor           # (...)
    options: Dict = field(default_factory=dict)


def _per_level(value, num_levels):
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_levels


def naive_oracle(case: Case):
    """(loss, grad, log_likelihood, agreement) per row, float64, by the literal mixture."""
    opts = {"temperature": 4.0, "expert_strength": 2.0, "level_weights": None,
            "gate_weight": 1.0, "expert_weight": 1.0, "ignore_index": -100, **case.options}
    s_all = case.student.detach().cpu().double().reshape(-1, case.student.shape[-1])
    num_rows, num_classes = s_all.shape
    teacher = case.teacher.detach().cpu().double()
    if teacher.dim() == case.student.dim():
        teacher = teacher.unsqueeze(0)
    teacher = teacher.reshape(teacher.shape[0], num_rows, num_classes)
    num_levels = teacher.shape[0]
    taus = _per_level(opts["temperature"], num_levels)
    betas = _per_level(opts["expert_strength"], num_levels)
    weights = opts["level_weights"] if opts["level_weights"] is not None else [1.0] * num_levels
    weights = [w / sum(weights) for w in weights]
    lam_g, lam_e = opts["gate_weight"], opts["expert_weight"]
    target = case.target.reshape(-1).cpu()

    loss = torch.zeros(num_rows, dtype=torch.float64)
    ll = torch.zeros(num_rows, dtype=torch.float64)
    agreement = torch.zeros(num_rows, dtype=torch.float64)
    grad = torch.zeros(num_rows, num_classes, dtype=torch.float64)
    eye = torch.eye(num_classes, dtype=torch.float64)
    for n in range(num_rows):
        y = int(target[n])
        if y == opts["ignore_index"]:
            continue
        s = s_all[n].clone().requires_grad_(True)
        log_p_y, joint = [], []
        for level in range(num_levels):
            pi = torch.softmax(teacher[level, n] / taus[level], dim=0)
            experts = torch.log_softmax(s[None, :] + betas[level] * eye, dim=1)  # row c = expert c
            log_p_y.append(experts[:, y])
            joint.append(weights[level] * pi * experts[:, y].detach().exp())
        joint = torch.stack(joint)                     # (L, C)
        r = joint / joint.sum()
        ll[n] = joint.sum().log()
        agreement[n] = r[:, y].sum()
        expert_ll = (r * torch.stack(log_p_y)).sum()
        gate = 0.0
        for level in range(num_levels):
            log_q = torch.log_softmax(s / taus[level], dim=0)
            gate = gate + taus[level] ** 2 * torch.where(r[level] == 0, 0.0, r[level] * log_q).sum()
        row_loss = 0.0
        if lam_e != 0:
            row_loss = row_loss - lam_e * expert_ll
        if lam_g != 0:
            row_loss = row_loss - lam_g * gate
        if not torch.is_tensor(row_loss):
            continue
        loss[n] = row_loss.detach()
        (grad[n],) = torch.autograd.grad(row_loss, s)
    return loss, grad, ll, agreement


def float64_oracle(case: Case):
    """The naive oracle where it is affordable, else the reference in float64."""
    num_classes = case.student.shape[-1]
    num_rows = case.target.numel()
    num_levels = case.teacher.shape[0] if case.teacher.dim() > case.student.dim() else 1
    if num_rows * num_levels * num_classes * num_classes <= 2_000_000:
        return naive_oracle(case)
    s, t, y = flatten_inputs(case.student.detach().cpu().double(), case.teacher.detach().cpu().double(),
                             case.target.cpu())
    opts = resolve_options(t.shape[0], **{
        "temperature": 4.0, "expert_strength": 2.0, "level_weights": None, "gate_weight": 1.0,
        "expert_weight": 1.0, "ignore_index": -100, **case.options})
    loss, ll, agreement, grad = reference_forward(s, t, y, opts)
    return loss, grad.double(), ll.double(), agreement.double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().double().cpu().reshape(-1)
    expected = expected.detach().double().cpu().reshape(-1)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "non-finite entries differ"
    assert torch.equal(expected[~finite].isnan(), actual[~finite].isnan()), "NaN entries differ"
    assert torch.equal(expected[~finite & ~expected.isnan()], actual[~finite & ~actual.isnan()]), \
        "infinite entries differ"
    denom = expected[finite].norm()
    diff = (actual[finite] - expected[finite]).norm()
    return float(diff / denom) if denom > 0 else float(diff)


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


def check_backend(backend: str, case: Case, tol: Optional[float] = None,
                  seed: int = 0) -> Dict[str, float]:
    """Run ``backend`` on ``case`` (reduction="none", random per-row grad_output)
    and compare loss, stats and gradient with the float64 oracle.

    Returns the relative errors; asserts each is within ``tol`` (default by dtype)
    and that the gradient comes back in the student's dtype.
    """
    tol = TOLERANCE[case.student.dtype] if tol is None else tol
    student = case.student.detach().clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, reduction="none",
                                    backend=backend, return_stats=True, **case.options)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = (torch.rand(case.target.shape, generator=g, dtype=torch.float64) + 0.5)
    loss.backward(grad_out.to(loss.device, loss.dtype))
    assert student.grad.dtype == case.student.dtype
    assert loss.shape == case.target.shape and stats.agreement.shape == case.target.shape

    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    exp_grad = exp_grad * grad_out.reshape(-1, 1)
    errs = {
        "loss": rel_err(loss, exp_loss),
        "grad": rel_err(student.grad.reshape(-1, case.student.shape[-1]), exp_grad),
        "log_likelihood": rel_err(stats.log_likelihood, exp_ll),
        "agreement": rel_err(stats.agreement, exp_agree),
    }
    for name, err in errs.items():
        assert err <= tol, f"{backend} {name}: rel err {err:.3g} > {tol:g} ({case.student.dtype})"
    return errs


def classic_kd(student, teacher, target, *, temperature, gate_weight, expert_weight,
               ignore_index=-100, reduction="none"):
    """λ_e·CE(s, y) + λ_g·τ²·KL(π ‖ q) per row, from torch.nn.functional."""
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
