"""The phase functions of a class slice: every backend's (``backends.Backend.phases``) against
the PyTorch ones of phases.py, phase by phase, given the same inputs; the whole-row result
against the float64 oracle is tests/test_vocab_parallel.py's."""

import math

import pytest
import torch

from moekd_kernels import TopKTeacher, phases
from moekd_kernels.backends import BACKENDS
from moekd_kernels.options import resolve_options
from moekd_kernels.teachers import topk_rows

KERNEL_PHASES = [n for n, b in BACKENDS.items() if b.phases is not None and n != "reference"]

NUM_CLASSES, LO, HI = 2100, 700, 2000  # a slice of 1300 classes: past the CPU kernel's 1024-class blocks


def _slice_case(teacher_kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, L = 8, 2
    student = (3 * torch.randn(N, NUM_CLASSES, generator=g)).to(dtype)
    logits = 3 * torch.randn(L, N, NUM_CLASSES, generator=g)
    target = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    target[:4] = torch.tensor([LO, HI - 1, LO - 1, HI])  # both ends of the slice, just outside it
    target[5] = -100
    opts = resolve_options(L, temperature=[1.0, 3.0], expert_strength=[2.0, 0.5], level_weights=[1.0, 2.0],
                           gate_weight=0.7, expert_weight=1.2, ignore_index=-100)
    if teacher_kind == "dense":
        teacher = logits[..., LO:HI].to(dtype)
    else:
        values, indices = logits.topk(300, dim=-1)  # listed classes on and off the slice
        if teacher_kind == "logprobs":
            values = torch.log_softmax(logits.double(), -1).gather(-1, indices)
        values = values.to(dtype)
        values[:, 2, 150:] = -math.inf
        teacher = topk_rows(TopKTeacher(indices, values, teacher_kind), L, L, N, NUM_CLASSES)
    return student[:, LO:HI], teacher, target, opts


def _loader(impl, teacher, opts, acc=torch.float32):
    if isinstance(teacher, torch.Tensor):
        return impl.dense_teacher(teacher, opts, acc)
    return impl.top_k_teacher(teacher, LO, HI - LO, opts, acc)


def _close(got, want, rtol, headroom=0.0):
    """rtol of the element, plus float32 headroom of the largest element of its row (the
    kernel's sums of ~1000 float32 terms), plus ``headroom`` (per element, if given)."""
    got, want = got.double(), want.double()
    bound = rtol * want.abs() + 1e-6 * want.abs().amax(-1, keepdim=True) + headroom
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    err = (got - want).abs()[finite]
    assert bool((err <= bound[finite]).all()), float((err / bound[finite]).max())


@pytest.mark.parametrize("backend", KERNEL_PHASES)
@pytest.mark.parametrize("teacher_kind", ["dense", "logits", "logprobs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_phases_equal_the_pytorch_phases_on_a_slice(backend, teacher_kind, dtype):
    """Each phase given the float64 PyTorch phases' inputs, against their float64 outputs."""
    reason = BACKENDS[backend].unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    impl = BACKENDS[backend].load_phases()
    student, teacher, target, opts = _slice_case(teacher_kind, dtype)
    kernel_loader = _loader(impl, teacher, opts)
    acc = torch.float64
    ref_loader, ref_student = _loader(phases.PYTORCH, teacher, opts, acc), student.double()

    # The maxima of the same float32 values t/τ: exactly those of the float32 PyTorch phase.
    maxima32 = phases.row_maxima(student, _loader(phases.PYTORCH, teacher, opts), torch.float32)
    assert torch.equal(impl.row_maxima(student, kernel_loader, torch.float32), maxima32)

    maxima = phases.row_maxima(ref_student, ref_loader, acc)
    sums = phases.row_sums_of_exp(ref_student, ref_loader, opts, maxima)
    _close(impl.row_sums_of_exp(student, kernel_loader, opts, maxima), sums, 1e-5)
    norm = phases.normalisers(maxima, sums, opts.num_levels)

    estep = phases.estep_sums(ref_student, ref_loader, target, opts, norm, LO)
    valid = target != opts.ignore_index  # finalize never reads an ignored row's sums
    # Σ u log D: a kernel may take log D of D = 1 + expm1(β)σ rounded to float32 (the Triton
    # kernels do, triton_kernels._u_sums): an absolute error of up to ulp(1)/2 per class,
    # weighted by u, so up to 2^-24 Σ_ℓc u_ℓc, however small the sum itself.
    u_total = estep[3:3 + opts.num_levels].sum(0)
    headroom = torch.zeros_like(estep)
    headroom[1] = 2.0 ** -24 * u_total
    _close(impl.estep_sums(student, kernel_loader, target, opts, norm, LO)[:, valid], estep[:, valid], 1e-5,
           headroom[:, valid])

    rows = phases.finalize(estep, target, opts, NUM_CLASSES)
    scale = torch.tensor(0.3)
    want = phases.slice_gradient(ref_student, ref_loader, target, opts, norm, rows, LO, scale)
    got = impl.slice_gradient(student, kernel_loader, target, opts, norm, rows, LO, scale)
    assert got.dtype == student.dtype and got.shape == student.shape
    assert bool((got[~valid] == 0).all())
    # bf16: one rounding of the element, 2^-8 of it (2^-7 leaves float32 headroom).
    _close(got, want, 1e-5 if dtype == torch.float32 else 2 ** -7)
