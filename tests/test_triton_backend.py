"""Backend "triton" against the float64 oracle.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before anything imports
Triton, and the kernel runs on CPU tensors under Triton's interpreter. With a
GPU the same tests run the compiled kernel on CUDA tensors.
"""

import itertools
import math
import os
import threading

import pytest
import torch

from conftest import requires
from moekd_kernels import TopKTeacher, fused_moe_kd_loss
from moekd_kernels import triton_backend
from moekd_kernels.backends import BACKENDS, resolve_backend
from oracle import (TOLERANCE, Case, check_backend, check_gradient, check_outputs, classic_kd, float64_oracle,
                    kernel_options, make_case, rel_err, term_scale)
# The dense teacher a TopKTeacher stands for, built from the definition.
from test_teachers import densify, top_k

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = BACKENDS["triton"].unavailable_reason(DEVICE)
# Only a missing Triton skips. With Triton installed (CI installs it), a broken
# TRITON_INTERPRET setup must fail, and test_interpreter_is_effective says why.
pytestmark = requires("backend 'triton'", _REASON if triton_backend._IMPORT_ERROR is not None else None)

# The largest single-block row for L = 1: BLOCK + 1 classes take the multi-block path.
BLOCK = triton_backend.TILES[DEVICE].single
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _opts(num_levels, **options):
    return kernel_options(num_levels, **options)


def _check_rows(out, case, tol=None):
    """Backend-level outputs (loss, ll, agreement, grad) against the float64 oracle, by the
    shared conformance check (``tol``, if given, bounds loss and stats)."""
    loss, ll, agreement, grad = out
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    return check_outputs("triton", (loss, grad, ll, agreement), (exp_loss, exp_grad, exp_ll, exp_agree),
                         case.student.dtype, tol, term_scale(case))


@pytest.fixture
def small_tile(monkeypatch):
    """32-value tiles on this device, so rows of a few dozen classes take the multi-block path."""
    monkeypatch.setitem(triton_backend.TILES, DEVICE, triton_backend.Tiles(32, 32, 32))
    return triton_backend.launch_config(10**9, 1, DEVICE)[0]


def test_interpreter_is_effective():
    if DEVICE == "cuda":
        assert _REASON is None
        return
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET=1"
    assert _REASON is None, _REASON
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_launch_table(device_type):
    tiles = triton_backend.TILES[device_type]
    for num_classes in (1, 2, 100, 4096, 4097, 8193, 16385, 131073):
        for num_levels in (1, 2, 3, 5):
            block, num_warps = triton_backend.launch_config(num_classes, num_levels, device_type)
            levels_padded = 1 << (num_levels - 1).bit_length()
            assert block & (block - 1) == 0 and block >= triton_backend.MIN_BLOCK
            assert num_warps in (4, 8, 16) and block * levels_padded <= tiles.single
            single = triton_backend._next_pow2(num_classes) * levels_padded <= tiles.single
            assert (num_classes <= block) == single
    assert triton_backend.launch_config(tiles.single, 1, device_type)[0] == tiles.single
    assert triton_backend.launch_config(tiles.single + 1, 1, device_type)[0] < tiles.single + 1


# C = 1, 2, 127 take the single-block path, BLOCK + 1 and 131073 loop over blocks.
# Few rows for large C, and for C = 131073 only L = 1, 3 with float32 and bfloat16:
# the interpreter's time grows with the number of blocks.
ORACLE_CASES = [
    (num_classes, num_rows, num_levels, dtype)
    for num_classes, num_rows in [(1, 6), (2, 8), (127, 8), (BLOCK + 1, 4), (131073, 2)]
    for num_levels in (1, 2, 3)
    for dtype in FLOAT_DTYPES
    if num_classes != 131073 or (num_levels != 2 and dtype != torch.float16)
]


@pytest.mark.parametrize("num_classes,num_rows,num_levels,dtype", ORACLE_CASES, ids=str)
def test_matches_oracle(num_classes, num_rows, num_levels, dtype):
    case = make_case(num_rows, num_classes, num_levels, dtype=dtype, device=DEVICE,
                     seed=num_classes + 7 * num_levels, ignore_frac=0.25,
                     temperature=[2.0, 4.0, 1.5][:num_levels], expert_strength=[2.0, 0.5, 6.0][:num_levels])
    check_backend("triton", case)


@pytest.mark.parametrize("num_levels", [1, 3])
def test_multi_block_with_small_tiles(small_tile, num_levels):
    assert triton_backend.launch_config(127, num_levels, DEVICE)[0] < 127
    case = make_case(6, 127, num_levels, device=DEVICE, seed=3, level_weights=[1.0, 0.0, 2.0][:num_levels])
    check_backend("triton", case)


def test_masked_classes_in_whole_blocks(small_tile):
    """−inf logits (padding) fill the first blocks entirely and part of the last: no NaN."""
    num_classes = 7 * small_tile + 5
    case = make_case(6, num_classes, 2, device=DEVICE, seed=5, ignore_frac=0.0)
    masked = torch.zeros(num_classes, dtype=torch.bool)
    masked[: 2 * small_tile + 3] = True
    masked[-2:] = True
    masked_teacher_only = torch.zeros(num_classes, dtype=torch.bool)
    masked_teacher_only[3 * small_tile: 3 * small_tile + 4] = True
    student = case.student.masked_fill(masked.to(DEVICE), float("-inf"))
    teacher = case.teacher.masked_fill((masked | masked_teacher_only).to(DEVICE), float("-inf"))
    target = torch.randint(2 * small_tile + 3, num_classes - 2, (6,)).to(DEVICE)
    case = Case(student, teacher, target)
    check_backend("triton", case)


def test_masked_classes_single_block():
    case = make_case(6, 50, 2, device=DEVICE, seed=6, ignore_frac=0.0)
    masked = (torch.arange(50) % 7 == 3).to(DEVICE)
    case = Case(case.student.masked_fill(masked, float("-inf")),
                case.teacher.masked_fill(masked, float("-inf")),
                torch.where(masked[case.target], 0, case.target))
    check_backend("triton", case)


@pytest.mark.parametrize("num_classes", [40, 200])
def test_masked_target_gives_inf_loss_and_finite_grad(num_classes):
    """Like F.cross_entropy: a −inf target logit in the student gives +inf, not NaN."""
    s = 3 * torch.randn(3, num_classes)
    t = 3 * torch.randn(1, 3, num_classes)
    y = torch.tensor([1, 5, 7])
    s[0, 1] = float("-inf")
    opts = _opts(1)
    loss, ll, agreement, grad = triton_backend.forward(s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), opts)
    ref_loss, ref_ll, ref_agree, ref_grad = BACKENDS["reference"].forward(s, t, y, opts)
    assert loss[0].item() == math.inf and ll[0].item() == -math.inf
    assert torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    assert rel_err(agreement, ref_agree) <= 1e-5


def test_nan_propagates_to_its_row_only():
    case = make_case(4, 300, 2, device=DEVICE, seed=8, ignore_frac=0.0)
    student, teacher = case.student.clone(), case.teacher.clone()
    student[1, 17] = float("nan")
    teacher[1, 2, 250] = float("nan")
    loss, ll, agreement, grad = triton_backend.forward(student, teacher, case.target, _opts(2))
    for rows in (loss, ll, agreement):
        assert rows[1:3].isnan().all() and torch.isfinite(rows[[0, 3]]).all()
    assert grad[1:3].isnan().any(dim=1).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_classes", [33, BLOCK + 1])
def test_reductions_and_grad_output(reduction, num_classes):
    case = make_case(6, num_classes, 2, device=DEVICE, seed=11, ignore_frac=0.3, temperature=[1.0, 3.0])
    results = {}
    for backend in ("triton", "reference"):
        student = case.student.clone().requires_grad_(True)
        loss = fused_moe_kd_loss(student, case.teacher, case.target, reduction=reduction,
                                 backend=backend, **case.options)
        grad_out = torch.linspace(-1.5, 2.5, loss.numel(), device=DEVICE).reshape(loss.shape)
        loss.backward(grad_out)
        results[backend] = (loss.detach(), student.grad)
    assert rel_err(results["triton"][0], results["reference"][0]) <= 1e-5
    assert rel_err(results["triton"][1], results["reference"][1]) <= 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_classes", [9, BLOCK + 1])
def test_all_ignored_batch(reduction, num_classes):
    student = torch.randn(3, num_classes, device=DEVICE, requires_grad=True)
    loss = fused_moe_kd_loss(student, torch.randn(2, 3, num_classes, device=DEVICE),
                             torch.full((3,), -1, device=DEVICE), ignore_index=-1,
                             reduction=reduction, backend="triton")
    assert (loss == 0).all()
    loss.sum().backward()
    assert (student.grad == 0).all()


def test_ignored_rows_are_exactly_zero_in_a_fresh_buffer():
    case = make_case(8, 70, 1, device=DEVICE, seed=12, ignore_frac=0.5, ignore_index=3)
    ignored = case.target == 3
    assert ignored.any() and not ignored.all()
    loss, ll, agreement, grad = triton_backend.forward(case.student, case.teacher.unsqueeze(0),
                                                       case.target, _opts(1, ignore_index=3))
    for rows in (loss, ll, agreement):
        assert (rows[ignored] == 0).all()
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any(dim=1).all()


@pytest.mark.parametrize("dtype,teacher_dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float32, torch.float64)], ids=str)
def test_mixed_teacher_dtype(dtype, teacher_dtype):
    case = make_case(6, 90, 2, dtype=dtype, teacher_dtype=teacher_dtype, device=DEVICE, seed=13)
    check_backend("triton", case)


def test_int32_target():
    case = make_case(6, 40, 1, device=DEVICE, seed=14)
    check_backend("triton", Case(case.student, case.teacher, case.target.int()))


def test_strided_inputs():
    """Row strides for student and teacher, a level-major teacher view, a transposed student."""
    num_rows, num_classes, num_levels = 5, 60, 3
    g = torch.Generator().manual_seed(15)
    wide = 3 * torch.randn(num_rows, num_classes + 13, generator=g)
    student = wide[:, 5:5 + num_classes]                                         # row stride C + 13
    row_major = 3 * torch.randn(num_rows, num_levels, num_classes, generator=g)
    teacher = row_major.permute(1, 0, 2)                                         # level stride C
    target = torch.randint(0, num_classes, (num_rows,), generator=g)
    target[2] = -100
    contiguous = Case(student.contiguous(), teacher.contiguous(), target)
    opts = _opts(num_levels)
    dev = [x.to(DEVICE) for x in (wide, row_major)]
    out = triton_backend.forward(dev[0][:, 5:5 + num_classes], dev[1].permute(1, 0, 2),
                                 target.to(DEVICE), opts)
    _check_rows(out, contiguous, 1e-5)
    # The class axis strided (a transposed view): copied, same result.
    transposed = student.t().contiguous().t()
    assert transposed.stride(1) != 1
    out_t = triton_backend.forward(transposed.to(DEVICE), teacher.to(DEVICE), target.to(DEVICE), opts)
    assert all(torch.equal(a, b) for a, b in zip(out, out_t))
    # One teacher for every level, broadcast with level stride 0.
    shared = teacher[:1].expand(num_levels, -1, -1)
    out_e = triton_backend.forward(student.to(DEVICE), shared.to(DEVICE), target.to(DEVICE), opts)
    _check_rows(out_e, Case(student, shared.contiguous(), target), 1e-5)


def test_strided_student_through_public_api():
    wide = (3 * torch.randn(6, 48, device=DEVICE)).requires_grad_(True)
    teacher = 3 * torch.randn(6, 40, device=DEVICE)
    target = torch.tensor([0, 39, 5, -100, 7, 12], device=DEVICE)
    loss = fused_moe_kd_loss(wide[:, 4:44], teacher, target, reduction="sum", backend="triton")
    loss.backward()
    student = wide.detach()[:, 4:44].clone().requires_grad_(True)
    fused_moe_kd_loss(student, teacher, target, reduction="sum", backend="reference").backward()
    assert rel_err(wide.grad[:, 4:44], student.grad) <= 1e-5
    assert (wide.grad[:, :4] == 0).all() and (wide.grad[:, 44:] == 0).all()


@pytest.mark.parametrize("gate_weight,expert_weight", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0.3, 1.7)])
def test_term_weights(gate_weight, expert_weight):
    case = make_case(6, 45, 2, device=DEVICE, seed=16, gate_weight=gate_weight,
                     expert_weight=expert_weight, expert_strength=[0.0, 50.0])
    check_backend("triton", case)


@pytest.mark.parametrize("num_classes", [30, BLOCK + 1])
def test_beta_zero_is_classic_kd(num_classes):
    """β = 0, L = 1: r = π, and the loss is Hinton KD plus the constant λ_g τ² H(π)."""
    tau, lam_g, lam_e = 2.5, 0.7, 1.3
    case = make_case(6, num_classes, 1, device=DEVICE, seed=17, ignore_frac=0.3)
    options = dict(temperature=tau, expert_strength=0.0, gate_weight=lam_g, expert_weight=lam_e)
    student = case.student.clone().requires_grad_(True)
    loss = fused_moe_kd_loss(student, case.teacher, case.target, reduction="none",
                             backend="triton", **options)
    grad_out = torch.rand(6, device=DEVICE) + 0.5
    loss.backward(grad_out)
    s64 = case.student.double().requires_grad_(True)
    t64 = case.teacher.double()
    classic = classic_kd(s64, t64, case.target, temperature=tau, gate_weight=lam_g, expert_weight=lam_e)
    classic.backward(grad_out.double())
    log_pi = torch.log_softmax(t64 / tau, dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    valid = case.target != -100
    expected = classic.detach() + torch.where(valid, lam_g * tau ** 2 * entropy, 0.0)
    assert rel_err(loss, expected) <= 1e-5
    assert rel_err(student.grad, s64.grad) <= 1e-5


def test_out_of_range_targets_give_nan_rows_without_reading_out_of_bounds():
    """The public API rejects these on CPU; the kernel's own guard is tested directly."""
    case = make_case(5, 50, 2, device=DEVICE, seed=18, ignore_frac=0.0)
    target = case.target.clone()
    target[1] = 50
    target[3] = -7
    # The student ends right at row 4's last class: a read at a target ≥ C would leave it.
    loss, ll, agreement, grad = triton_backend.forward(case.student, case.teacher, target, _opts(2))
    bad = torch.tensor([False, True, False, True, False], device=DEVICE)
    for rows in (loss, ll, agreement):
        assert rows[bad].isnan().all() and torch.isfinite(rows[~bad]).all()
    assert grad[bad].isnan().all() and torch.isfinite(grad[~bad]).all()
    good = Case(case.student[~bad], case.teacher[:, ~bad], target[~bad])
    _check_rows((loss[~bad], ll[~bad], agreement[~bad], grad[~bad]), good, 1e-5)


def test_empty_batch():
    out = triton_backend.forward(torch.randn(0, 7, device=DEVICE), torch.randn(2, 0, 7, device=DEVICE),
                                 torch.zeros(0, dtype=torch.long, device=DEVICE), _opts(2))
    assert [tuple(x.shape) for x in out] == [(0,), (0,), (0,), (0, 7)]


def test_float64_student_is_refused_with_its_name():
    with pytest.raises(TypeError, match="student_logits"):
        triton_backend.forward(torch.randn(2, 3, dtype=torch.float64), torch.randn(1, 2, 3),
                               torch.tensor([0, 1]), _opts(1))
    with pytest.raises(TypeError, match="student_logits"):
        fused_moe_kd_loss(torch.randn(2, 3, dtype=torch.float64, device=DEVICE),
                          torch.randn(2, 3, device=DEVICE), torch.tensor([0, 1], device=DEVICE),
                          backend="triton")


def test_unavailable_reasons_are_clear():
    assert "cuda" in triton_backend.unavailable_reason("mps")
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason("cpu")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_launch_never_syncs_and_auto_picks_triton():
    case = make_case(64, 5000, 2, dtype=torch.bfloat16, device="cuda", seed=19)
    student = case.student.clone().requires_grad_(True)
    fused_moe_kd_loss(student, case.teacher, case.target, backend="triton").backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_backend.forward(case.student, case.teacher, case.target, _opts(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device and ~4.3 GB of its memory")
def test_cuda_row_offsets_past_int32():
    """A row stride of 2^31 elements: the row offset needs 64 bits."""
    num_classes = 1000
    buffer = torch.empty(2 ** 31 + num_classes, dtype=torch.bfloat16, device="cuda")
    student = buffer.as_strided((2, num_classes), (2 ** 31, 1))
    student.copy_(3 * torch.randn(2, num_classes, device="cuda"))
    teacher = 3 * torch.randn(1, 2, num_classes, device="cuda")
    target = torch.tensor([3, 999], device="cuda")
    out = triton_backend.forward(student, teacher, target, _opts(1))
    ref = triton_backend.forward(student.contiguous(), teacher, target, _opts(1))
    del buffer, student
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("target_programs", [8192, 1])
def test_scale_rows_in_place_in_float32(monkeypatch, dtype, per_row, target_programs):
    """Backward's GPU scaling pass: every element scaled once, in place, by a float32 factor
    (stride 0 for "mean"/"sum"), rows longer than one block and a ragged last block, split
    into one-block spans or walked whole by one program (target_programs = 1)."""
    monkeypatch.setattr(triton_backend, "SCALE_TARGET_PROGRAMS", target_programs)
    torch.manual_seed(3)
    rows, classes = 5, 2 * triton_backend.SCALE_BLOCK + 37
    grad = torch.randn(rows, classes, device=DEVICE).to(dtype)
    before = grad.clone()
    if per_row:
        scale = torch.rand(rows, device=DEVICE) * 3 - 1
        scale[1] = 1.0  # a factor of 1 leaves its row as it is (the kernel skips it)
    else:
        scale = torch.tensor(1 / 3, device=DEVICE).expand(rows)
    out = triton_backend.scale_rows_(grad, scale)
    assert out.data_ptr() == grad.data_ptr()
    product = before.float() * scale.float()[:, None]
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # The interpreter converts to bf16 by truncation (the GPU rounds to nearest):
        # within one bf16 step of the float32 product.
        torch.testing.assert_close(grad.float(), product, rtol=2.0 ** -7, atol=0)
    else:
        # Exact: a factor rounded to fp16 first would change some of these.
        assert torch.equal(grad, product.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_multiplies_the_gradient_in_float32(dtype):
    """forward(..., grad_scale) is how "mean" folds 1/n_valid into the kernel: the gradient
    times the factor (before rounding), loss and stats unchanged, ignored rows still 0."""
    case = make_case(6, 300, 2, dtype=dtype, device=DEVICE, seed=11, ignore_frac=0.3)
    opts = _opts(2)
    teacher = case.teacher if case.teacher.dim() == 3 else case.teacher.unsqueeze(0)
    plain = triton_backend.forward(case.student, teacher, case.target, opts)
    factor = torch.tensor(1 / 7, device=DEVICE)
    scaled = triton_backend.forward(case.student, teacher, case.target, opts, factor)
    for a, b in zip(plain[:3], scaled[:3]):
        assert torch.equal(a, b)
    _check_rows(plain, case)
    # The scaled gradient is the float64 one times the factor, rounded once to the dtype.
    exp_grad = float64_oracle(case)[1] * float(factor)
    check_gradient("scaled grad", scaled[3], exp_grad, term_scale(case) * float(factor))
    assert (scaled[3][case.target == -100] == 0).all()


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("multi_block", [False, True], ids=["single-block", "multi-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_grad_loss_and_stats_are_the_same_bits(monkeypatch, multi_block, dtype):
    """need_grad=False compiles the kernel without its gradient pass and allocates no
    gradient: grad is None; loss and stats equal the gradient run's to the bit,
    ignored and out-of-range rows included."""
    if multi_block:
        monkeypatch.setitem(triton_backend.TILES, DEVICE, triton_backend.Tiles(32, 32, 32))
    case = make_case(6, 70, 2, dtype=dtype, device=DEVICE, seed=21, ignore_frac=0.0,
                     temperature=[1.0, 3.0], expert_strength=[0.5, 30.0])
    target = case.target.clone()
    target[1], target[4] = -100, 70
    opts = _opts(2, temperature=[1.0, 3.0], expert_strength=[0.5, 30.0])
    factor = torch.tensor(0.25, device=DEVICE)
    with_grad = triton_backend.forward(case.student, case.teacher, target, opts, factor)
    without = triton_backend.forward(case.student, case.teacher, target, opts, factor, need_grad=False)
    assert with_grad[3] is not None and without[3] is None
    for got, want in zip(without[:3], with_grad[:3]):
        assert _same_bits(got, want)
    assert without[0][1] == 0 and without[0][4].isnan()


@pytest.mark.parametrize("class_strided", [False, True])
def test_teacher_shared_by_levels_is_read_in_place(monkeypatch, class_strided):
    """teacher_2d.unsqueeze(0).expand(L, N, C) reaches the kernel as that view (level stride
    0, the head's own memory; a class-strided head is copied once, not L times) and gives
    the bits of the stacked teacher."""
    case = make_case(5, 70, 1, device=DEVICE, seed=34, ignore_frac=0.2)
    head = case.teacher.t().contiguous().t() if class_strided else case.teacher
    shared = head.unsqueeze(0).expand(3, -1, -1)
    opts = _opts(3, temperature=[1.0, 2.0, 4.0], expert_strength=[0.5, 2.0, 8.0])
    kernel, seen = triton_backend.triton_kernels.moe_kd_row_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(args[2])  # the teacher
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_backend.triton_kernels, "moe_kd_row_kernel", Spy())
    got = triton_backend.forward(case.student, shared, case.target, opts)
    (teacher_arg,) = seen
    assert teacher_arg.stride(0) == 0 and teacher_arg.shape == shared.shape
    assert (teacher_arg.data_ptr() == head.data_ptr()) != class_strided
    want = triton_backend.forward(case.student, shared.contiguous(), case.target, opts)
    for a, b in zip(got, want):
        assert _same_bits(a, b)


# ---- a top-k teacher (TopKTeacher): its own kernel, held to the oracle on the dense teacher ----

def _check_top_k(student, teacher, target, **options):
    """backend="triton" with ``teacher`` against the float64 oracle on the dense teacher it
    stands for, built by test_teachers.densify (the issue's definition, not the package's).

    Loss and stats within TOLERANCE; the gradient element by element (one wrong listed
    class fails): within its roundings to the student's dtype (in the kernel and in
    backward's scaling by grad_output; the interpreter truncates to bf16: each under one
    ulp, 2^-7 of the element) plus float32 headroom of the row's largest element.
    """
    tol = TOLERANCE[student.dtype]
    dense = densify(teacher.indices.cpu(), teacher.values.cpu(), teacher.kind, student.shape[-1])
    shared_levels = len(options.get("temperature", ())) if isinstance(options.get("temperature"), tuple) else 0
    if dense.dim() == student.dim() and shared_levels > 1:
        dense = dense.expand(shared_levels, *dense.shape)  # one head at several temperatures
    s = student.detach().clone().requires_grad_(True)
    loss, stats = fused_moe_kd_loss(s, teacher, target, reduction="none", backend="triton",
                                    return_stats=True, **options)
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(loss.device, loss.dtype))
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(Case(student.cpu(), dense, target.cpu(), options))
    for name, got, want in (("loss", loss, exp_loss), ("log_likelihood", stats.log_likelihood, exp_ll),
                            ("agreement", stats.agreement, exp_agree)):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g}"
    assert s.grad.dtype == student.dtype
    got = s.grad.detach().cpu().double().reshape(exp_grad.shape)
    exp_grad = exp_grad * grad_out.reshape(-1, 1)
    elem_tol = 2 * 2.0 ** -7 if student.dtype == torch.bfloat16 else 1e-5
    bound = elem_tol * exp_grad.abs() + 2.0 ** -20 * exp_grad.abs().amax(-1, keepdim=True)
    assert bool(((got - exp_grad).abs() <= bound).all()), float(((got - exp_grad).abs() / bound).max())
    return loss, stats, s.grad


def _top_k_inputs(seed, num_rows, num_classes, k, kind, num_levels=1, dtype=torch.float32, overlap=0.0):
    """Student, TopKTeacher (one level: (N, K); else (L, N, K) with each level's own classes,
    teacher logits ``overlap``-correlated between levels so that some classes are listed at
    several), and a target with ignored rows and one label among level 0's listed classes."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(num_rows, num_classes, generator=g)).to(dtype)
    target = torch.randint(0, num_classes, (num_rows,), generator=g)
    head = 3 * torch.randn(num_rows, num_classes, generator=g)
    pairs = [top_k((overlap * head + (1 - overlap ** 2) ** 0.5 * 3 * torch.randn(head.shape, generator=g)
                    if level else head).to(dtype), k, kind) for level in range(num_levels)]
    indices = torch.stack([i for i, _ in pairs]) if num_levels > 1 else pairs[0][0]
    values = torch.stack([v for _, v in pairs]) if num_levels > 1 else pairs[0][1]
    target[0] = pairs[0][0][0, -1]
    target[1] = -100
    return (student.to(DEVICE), TopKTeacher(indices.to(DEVICE), values.to(DEVICE), kind),
            target.to(DEVICE))


@pytest.fixture
def small_top_k_tiles(monkeypatch, small_tile):
    """32-value class tiles and 4-entry steps over K: rows and K both take several blocks."""
    monkeypatch.setitem(triton_backend.TOPK_TILES, DEVICE, triton_backend.TopKTiles(4, 4))
    return small_tile


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("k", [1, 6, 37])
def test_top_k_teacher_matches_oracle(kind, k):
    """K = 1, K < C and K = C (no class left unlisted) in one block of 37 classes."""
    student, teacher, target = _top_k_inputs(k, 8, 37, k, kind)
    _check_top_k(student, teacher, target, temperature=2.0, expert_strength=1.5)


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("num_levels", [1, 2])
def test_top_k_teacher_multi_block(small_top_k_tiles, kind, tau, num_levels):
    """Rows of 100 classes in 32-class blocks, 11 entries in 4-entry steps; two levels with
    their own, partly shared, classes (the kernel's search)."""
    assert triton_backend.launch_config(100, num_levels, DEVICE)[0] < 100
    student, teacher, target = _top_k_inputs(20 + num_levels, 7, 100, 11, kind, num_levels, overlap=0.9)
    if num_levels == 2:
        shared = set(teacher.indices[0, 2].tolist()) & set(teacher.indices[1, 2].tolist())
        assert shared, "the two levels should list some class of row 2 both"
    _check_top_k(student, teacher, target, temperature=[tau, 1.7][:num_levels],
                 expert_strength=[2.0, 0.5][:num_levels])


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
def test_top_k_padding_entries_are_never_read(small_top_k_tiles, kind):
    """−inf values are padding: their classes count as unlisted, and their indices (here
    out of range) are never read nor written; a logprobs row of padding alone is the uniform
    teacher."""
    student, teacher, target = _top_k_inputs(30, 6, 70, 9, kind)
    values, indices = teacher.values.clone(), teacher.indices.clone()
    values[2, 3:] = -math.inf
    values[4, ::2] = -math.inf
    indices[2, 3:] = 70 + 10 ** 6
    indices[4, ::2] = -(10 ** 6)
    if kind == "logprobs":
        values[5] = -math.inf
    _check_top_k(student, TopKTeacher(indices, values, kind), target, temperature=1.5)


@pytest.mark.parametrize("multi_block", [False, True])
def test_top_k_no_mass_left(monkeypatch, multi_block):
    """ρ = 0 (listed log-probs summing to 1, a hair above after rounding): the unlisted
    classes get nothing, as for the same values given as logits."""
    if multi_block:
        monkeypatch.setitem(triton_backend.TILES, DEVICE, triton_backend.Tiles(32, 32, 32))
        monkeypatch.setitem(triton_backend.TOPK_TILES, DEVICE, triton_backend.TopKTiles(4, 4))
    g = torch.Generator().manual_seed(6)
    student = 3 * torch.randn(5, 50, generator=g)
    target = torch.randint(0, 50, (5,), generator=g)
    indices = torch.stack([torch.randperm(50, generator=g)[:6] for _ in range(5)])
    values = (torch.log_softmax(3 * torch.randn(5, 6, generator=g, dtype=torch.float64), -1) + 1e-6).float()
    teacher = TopKTeacher(indices.to(DEVICE), values.to(DEVICE), "logprobs")
    student, target = student.to(DEVICE), target.to(DEVICE)
    loss, _, grad = _check_top_k(student, teacher, target, temperature=4.0)
    as_logits = _check_top_k(student, TopKTeacher(teacher.indices, teacher.values, "logits"), target,
                             temperature=4.0)
    assert rel_err(loss, as_logits[0]) <= 1e-6 and rel_err(grad, as_logits[2]) <= 1e-6


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
def test_top_k_one_head_at_several_temperatures_is_read_in_place(monkeypatch, small_top_k_tiles, kind):
    """A (N, K) teacher at L = 3 temperatures reaches the kernel with level stride 0 (no copy,
    no search: entry k names one class at every level), and matches the oracle; the same
    head stacked L times (a search over equal class sets) gives the same numbers."""
    student, teacher, target = _top_k_inputs(40, 6, 90, 7, kind)
    options = dict(temperature=(1.0, 2.0, 4.0), expert_strength=[0.5, 2.0, 8.0])
    kernel, seen = triton_backend.triton_kernels.moe_kd_topk_row_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args[2], args[6], kwargs["SEARCH"]))  # indices, values, SEARCH
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_backend.triton_kernels, "moe_kd_topk_row_kernel", Spy())
    shared = _check_top_k(student, teacher, target, **options)
    stacked = TopKTeacher(teacher.indices.expand(3, -1, -1).contiguous(),
                          teacher.values.expand(3, -1, -1).contiguous(), kind)
    dense_levels = _check_top_k(student, stacked, target, **options)
    (indices, values, search), (_, _, stacked_search) = seen
    assert indices.stride(0) == 0 and values.stride(0) == 0 and not search and stacked_search
    assert indices.data_ptr() == teacher.indices.data_ptr()
    for a, b in zip((shared[0], *shared[1], shared[2]), (dense_levels[0], *dense_levels[1], dense_levels[2])):
        assert rel_err(a, b) <= 1e-6


def test_top_k_three_levels_with_their_own_classes(small_top_k_tiles):
    student, teacher, target = _top_k_inputs(50, 6, 64, 10, "logprobs", num_levels=3, overlap=0.95)
    _check_top_k(student, teacher, target, temperature=[1.0, 3.0, 0.7], expert_strength=[1.0, 4.0, 0.0],
                 level_weights=[1.0, 2.0, 0.5])


@pytest.mark.parametrize("kind", ["logits", "logprobs"])
@pytest.mark.parametrize("multi_block", [False, True])
def test_top_k_bfloat16(monkeypatch, kind, multi_block):
    if multi_block:
        monkeypatch.setitem(triton_backend.TILES, DEVICE, triton_backend.Tiles(32, 32, 32))
        monkeypatch.setitem(triton_backend.TOPK_TILES, DEVICE, triton_backend.TopKTiles(4, 4))
    student, teacher, target = _top_k_inputs(60, 6, 75, 8, kind, dtype=torch.bfloat16)
    _check_top_k(student, teacher, target, temperature=2.0)


def test_top_k_lead_dims_and_mean():
    """(B, T, K) indices with (B, T, C) logits; "mean" folds 1/n into the kernel's gradient."""
    g = torch.Generator().manual_seed(70)
    student = (3 * torch.randn(2, 4, 30, generator=g)).to(DEVICE)
    target = torch.randint(0, 30, (2, 4), generator=g).to(DEVICE)
    target[1, 2] = -100
    indices, values = top_k(3 * torch.randn(2, 4, 30, generator=g), 5, "logprobs")
    teacher = TopKTeacher(indices.to(DEVICE), values.to(DEVICE), "logprobs")
    _check_top_k(student, teacher, target)
    results = []
    for backend in ("triton", "reference"):
        s = student.clone().requires_grad_(True)
        loss = fused_moe_kd_loss(s, teacher, target, backend=backend)
        loss.backward()
        results.append((loss.detach(), s.grad))
    assert rel_err(results[0][0], results[1][0]) <= 1e-5 and rel_err(results[0][1], results[1][1]) <= 1e-5


@pytest.mark.parametrize("gate_weight,expert_weight,beta", [(0.0, 1.0, 2.0), (1.0, 0.0, 0.0), (0.3, 1.7, 50.0)])
def test_top_k_term_weights(small_top_k_tiles, gate_weight, expert_weight, beta):
    student, teacher, target = _top_k_inputs(80, 6, 45, 5, "logprobs")
    _check_top_k(student, teacher, target, gate_weight=gate_weight, expert_weight=expert_weight,
                 expert_strength=beta)


def _kernel_rows(teacher, num_levels, num_rows, num_classes):
    """The backends' form of a TopKTeacher, as the public API builds it."""
    from moekd_kernels.teachers import topk_rows

    own_levels = teacher.indices.shape[0] if teacher.indices.dim() == 3 else 1
    return topk_rows(teacher, own_levels, num_levels, num_rows, num_classes)


@pytest.mark.parametrize("multi_block", [False, True], ids=["single-block", "multi-block"])
@pytest.mark.parametrize("kind", ["logits", "logprobs"])
def test_top_k_without_grad_loss_and_stats_are_the_same_bits(monkeypatch, multi_block, kind):
    if multi_block:
        monkeypatch.setitem(triton_backend.TILES, DEVICE, triton_backend.Tiles(32, 32, 32))
        monkeypatch.setitem(triton_backend.TOPK_TILES, DEVICE, triton_backend.TopKTiles(4, 4))
    student, teacher, target = _top_k_inputs(90, 6, 70, 9, kind, num_levels=2, overlap=0.9)
    target[4] = 70  # out of range: a NaN row, in both runs
    rows = _kernel_rows(teacher, 2, 6, 70)
    opts = _opts(2, temperature=[1.0, 3.0], expert_strength=[0.5, 30.0])
    factor = torch.tensor(0.25, device=DEVICE)
    with_grad = triton_backend.forward(student, rows, target, opts, factor)
    without = triton_backend.forward(student, rows, target, opts, factor, need_grad=False)
    assert with_grad[3] is not None and without[3] is None
    for got, want in zip(without[:3], with_grad[:3]):
        assert _same_bits(got, want)
    assert without[0][1] == 0 and without[0][4].isnan() and (with_grad[3][1] == 0).all()


def test_top_k_strided_entries_are_read_through_their_strides():
    """Indices, values and rest as strided views (every other entry of wider buffers, a
    transposed level axis): the bits of contiguous copies."""
    from moekd_kernels.teachers import TopKRows

    student, teacher, target = _top_k_inputs(100, 5, 40, 6, "logprobs", num_levels=2, overlap=0.5)
    rows = _kernel_rows(teacher, 2, 5, 40)
    wide = lambda x: torch.stack([x, x], -1).reshape(*x.shape[:-1], -1)[..., ::2]  # noqa: E731
    strided = TopKRows(wide(rows.indices), wide(rows.values.transpose(0, 1).contiguous()).transpose(0, 1),
                       torch.stack([rows.rest, rows.rest], -1)[..., 0])
    assert strided.indices.stride(2) == 2 and strided.values.stride() == (12, 24, 2) and strided.rest.stride(1) == 2
    opts = _opts(2)
    got = triton_backend.forward(student, strided, target, opts)
    want = triton_backend.forward(student, TopKRows(*(x.contiguous() for x in rows)), target, opts)
    for a, b in zip(got, want):
        assert _same_bits(a, b)


def test_top_k_student_masked_class_the_teacher_lists():
    """A class the student masks (−inf) while a logprobs teacher lists it or leaves it mass:
    loss +inf as for the dense teacher, finite gradient and stats, never NaN. The kernel's
    per-entry differences must not form inf − inf."""
    student, teacher, target = _top_k_inputs(110, 4, 40, 5, "logprobs")
    student, values = student.clone(), teacher.values.clone()
    # Row 2 lists the class below the unlisted classes' share, row 3 above it: the listed
    # term minus the unlisted one is +inf · … in one, −inf · … in the other.
    values[2, 1] = -30.0
    teacher = TopKTeacher(teacher.indices, values, "logprobs")
    student[2, teacher.indices[2, 1]] = -math.inf
    student[3, teacher.indices[3, 0]] = -math.inf
    target[2:] = torch.tensor([int(teacher.indices[2, 0]), int(teacher.indices[3, 2])], device=DEVICE)
    opts = _opts(1)
    rows = _kernel_rows(teacher, 1, 4, 40)
    loss, ll, agreement, grad = triton_backend.forward(student, rows, target, opts)
    dense = densify(teacher.indices.cpu(), teacher.values.cpu(), "logprobs", 40).float().unsqueeze(0)
    want = BACKENDS["reference"].forward(student.cpu(), dense, target.cpu(), opts)
    assert loss[2].item() == math.inf and loss[3].item() == math.inf
    assert torch.isfinite(grad).all() and torch.isfinite(ll).all() and torch.isfinite(agreement).all()
    for got, expected in zip((loss, ll, agreement, grad), want):
        assert rel_err(got, expected) <= 1e-5


def test_top_k_nan_value_propagates_to_its_row_only(small_top_k_tiles):
    student, teacher, target = _top_k_inputs(120, 4, 70, 6, "logprobs")
    target[1] = 3
    values = teacher.values.clone()
    values[1, 4] = float("nan")
    rows = _kernel_rows(TopKTeacher(teacher.indices, values, "logprobs"), 1, 4, 70)
    loss, ll, agreement, grad = triton_backend.forward(student, rows, target, _opts(1))
    for out in (loss, ll, agreement):
        assert out[1].isnan() and torch.isfinite(out[[0, 2, 3]]).all()
    assert grad[1].isnan().any() and torch.isfinite(grad[[0, 2, 3]]).all()


def test_top_k_builds_no_dense_teacher(monkeypatch):
    """Through the public API, the kernel's only (N, C)-sized tensors are the student and
    its gradient: the teacher arrives as its K entries per row and level."""
    student, teacher, target = _top_k_inputs(130, 6, 50, 4, "logprobs", num_levels=2)
    kernel, seen = triton_backend.triton_kernels.moe_kd_topk_row_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append([a for a in args if isinstance(a, torch.Tensor)])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_backend.triton_kernels, "moe_kd_topk_row_kernel", Spy())
    s = student.clone().requires_grad_(True)
    fused_moe_kd_loss(s, teacher, target, backend="triton").backward()
    (tensors,) = seen
    large = [t for t in tensors if t.numel() >= 6 * 50]
    assert len(large) == 2 and large[0].data_ptr() == s.data_ptr()   # the student, then the gradient
    assert large[1].shape == (6, 50) and large[1].data_ptr() != s.data_ptr()
    assert max(t.numel() for t in tensors if t.numel() < 6 * 50) <= 2 * 6 * 4


def test_auto_routes_top_k_teachers_to_triton_on_gpus(monkeypatch, caplog):
    """On CUDA tensors "cuda" comes first but reads no top-k teacher: auto takes "triton"
    for one, and logs why (simulated: every backend reports itself available)."""
    from moekd_kernels.backends import Backend, auto_backend

    assert not BACKENDS["cuda"].top_k_teacher and BACKENDS["triton"].top_k_teacher
    monkeypatch.setattr(Backend, "unavailable_reason", lambda self, device_type: None)
    with caplog.at_level("INFO", logger="moekd_kernels"):
        assert auto_backend.__wrapped__("cuda", 2, True) == "triton"
    assert "'triton'" in caplog.text and "'cuda' cannot read one" in caplog.text
    assert auto_backend.__wrapped__("cuda", 2, False) == "cuda"


# Compiles the kernels for an H100/H200 (sm_90) without a GPU, outside the interpreter:
# what the interpreter accepts, Triton's compiler may not (data-dependent Python control
# flow, a loop over a tensor's values), and CI has no GPU to find out.
_COMPILE_FOR_SM90 = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekd_kernels import triton_kernels as tk

PER_LEVEL = ("tau", "inv_tau", "beta", "exp_beta", "expm1_beta", "level_weight")
POINTERS = {"student_ptr": "*bf16", "teacher_ptr": "*bf16", "value_ptr": "*bf16", "index_ptr": "*i64",
            "target_ptr": "*i64", "grad_ptr": "*bf16", "rest_ptr": "*bf16"}

def compile_sm90(fn, **constants):
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*fp32")
        elif name in PER_LEVEL:
            signature[name] = ("fp32",) * constants["L"]
        elif name in ("gate_weight", "expert_weight"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if "stride" in name else "i32"
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".target sm_90" in kernel.asm["ptx"]
    print(fn.__name__, constants["L"], constants.get("SEARCH"), constants.get("SINGLE_BLOCK"),
          constants.get("PHASE"), "ok")

flags = dict(HAS_EXPERT=True, HAS_GATE=True, HAS_GRAD_SCALE=True, NEED_GRAD=True)
compile_sm90(tk.moe_kd_row_kernel, L=2, LP=2, BLOCK=1024, SINGLE_BLOCK=False, **flags)
for (levels, search), single in itertools.product([(1, False), (2, False), (3, True)], [True, False]):
    padded = 1 << (levels - 1).bit_length()
    compile_sm90(tk.moe_kd_topk_row_kernel, L=levels, LP=padded, BLOCK=1024, SINGLE_BLOCK=single, KB=32,
                 SEARCH=search, QB=32 * (padded if search else 1), **flags)
phase_flags = dict(HAS_EXPERT=True, HAS_GATE=True, HAS_GRAD_SCALE=True)
for phase, (top_k, levels, search) in itertools.product(range(4), [(False, 2, False), (True, 3, True)]):
    padded = 1 << (levels - 1).bit_length()
    compile_sm90(tk.moe_kd_phase_kernel, PHASE=phase, TOP_K=top_k, L=levels, LP=padded, BLOCK=1024, KB=32,
                 SEARCH=search, QB=32 * (padded if search else 1), **phase_flags)
"""


def test_kernels_compile_for_a_gpu():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(" ok") == 15, done.stdout


# ---- the phases over class slices (phases.py's contract; the vocab-parallel path) ----
#
# Every slice runs phases.slice_rows with the Triton phase functions, in a thread of its own;
# the combine step between the phases joins the slices' partial results as the all-reduces
# of vocab_parallel.py would. The whole rows' loss and stats, and each slice's gradient,
# are held to the float64 oracle at the tolerances of tests/test_vocab_parallel.py.

class _LockstepCombine:
    """``phases.slice_rows``' combine for slices run in threads of one process: each step
    returns once every slice has given its part. Only one thread computes at a time (each
    holds ``turn`` except while it waits here): Triton's interpreter is not thread-safe."""

    def __init__(self, num_slices):
        self.turn = threading.Condition()
        self.num_slices = num_slices
        self.parts, self.results = [], []
        self.failed = False

    def _join(self, tensor, reduce):
        step = len(self.results)
        self.parts.append(tensor)
        if len(self.parts) == self.num_slices:
            self.results.append(reduce(torch.stack(self.parts)))
            self.parts = []
            self.turn.notify_all()
        else:
            self.turn.wait_for(lambda: len(self.results) > step or self.failed)
            if self.failed:
                raise RuntimeError("another slice failed")
        return self.results[step]

    def max_(self, tensor):
        return self._join(tensor, lambda parts: parts.amax(0))

    def sum_(self, tensor):
        return self._join(tensor, lambda parts: parts.sum(0))


def _offsets(widths):
    return [0] + list(itertools.accumulate(widths))


def _sliced_rows(student, teacher, target, opts, widths, grad_scale):
    """(loss, log_likelihood, agreement, grad) of every slice of ``widths`` classes, from
    ``phases.slice_rows`` with backend "triton"'s phase functions; ``teacher`` the dense
    logits (L, N, C) or a TopKRows with global indices."""
    from moekd_kernels import phases
    from moekd_kernels.teachers import TopKRows

    impl = BACKENDS["triton"].load_phases()
    offsets = _offsets(widths)
    combine = _LockstepCombine(len(widths))
    results, errors = [None] * len(widths), []

    def run(i):
        lo, hi = offsets[i], offsets[i + 1]
        with combine.turn:
            try:
                if isinstance(teacher, TopKRows):
                    impl.check_inputs(student[:, lo:hi], teacher.values)
                    loader = impl.top_k_teacher(teacher, lo, hi - lo, opts, torch.float32)
                else:
                    impl.check_inputs(student[:, lo:hi], teacher[..., lo:hi])
                    loader = impl.dense_teacher(teacher[..., lo:hi], opts, torch.float32)
                results[i] = phases.slice_rows(student[:, lo:hi], loader, target, opts, num_classes=offsets[-1],
                                               grad_scale=grad_scale, combine=combine, class_offset=lo,
                                               impl=impl)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other slices stop
                errors.append(exc)
                combine.failed = True
                combine.turn.notify_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(widths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a slice hangs"
    if errors:
        raise errors[0]
    return results


def _check_sliced(student, teacher, target, widths, dense, options, scale=0.5):
    """Every slice's loss and stats (the whole rows') and gradient (its classes', times
    ``scale``) against the float64 oracle on the dense teacher ``dense``."""
    opts = _opts(dense.shape[0] if dense.dim() == 3 else 1, **options)
    results = _sliced_rows(student, teacher, target, opts, widths, torch.tensor(scale, device=DEVICE))
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(Case(student.cpu(), dense.cpu(), target.cpu(), options))
    offsets = _offsets(widths)
    grad_tol = 1e-5 if student.dtype == torch.float32 else 2 ** -8
    ignored = (target == -100).cpu()
    for i, (loss, ll, agreement, grad) in enumerate(results):
        for name, got, want in (("loss", loss, exp_loss), ("log_likelihood", ll, exp_ll),
                                ("agreement", agreement, exp_agree)):
            got, want = got.detach().cpu().double(), want.double()
            assert bool(((got - want).abs() <= 1e-5 * want.abs() + 1e-7).all()), \
                f"slice {i} {name}: max err {float((got - want).abs().max()):.3g}"
        lo, hi = offsets[i], offsets[i + 1]
        assert grad.dtype == student.dtype and grad.shape == (student.shape[0], hi - lo)
        got, want = grad.cpu().double(), scale * exp_grad[:, lo:hi]
        assert bool((got[ignored] == 0).all())
        err = (got - want).abs()
        assert bool((err <= grad_tol * want.abs().max()).all()), f"slice {i} grad: max err {float(err.max()):.3g}"


def _sliced_inputs(seed, num_rows, widths, num_levels, dtype):
    """Student, teacher logits and targets: each slice's first and last class, an ignored row."""
    g = torch.Generator().manual_seed(seed)
    num_classes = sum(widths)
    student = (3 * torch.randn(num_rows, num_classes, generator=g)).to(dtype)
    teacher = (3 * torch.randn(num_levels, num_rows, num_classes, generator=g)).to(dtype)
    target = torch.randint(0, num_classes, (num_rows,), generator=g)
    offsets = _offsets(widths)
    boundaries = sorted({c for lo, hi in zip(offsets, offsets[1:]) for c in (lo, hi - 1)})[:num_rows - 2]
    target[:len(boundaries)] = torch.tensor(boundaries)
    target[-2] = -100
    return student.to(DEVICE), teacher.to(DEVICE), target.to(DEVICE)


def _level_options(num_levels):
    if num_levels == 1:
        return dict(temperature=2.0, expert_strength=1.5, gate_weight=0.7, expert_weight=1.2)
    return dict(temperature=[1.0, 3.0], expert_strength=[2.0, 0.5], level_weights=[1.0, 2.0],
                gate_weight=0.7, expert_weight=1.2)


# Few rows and cases: the interpreter's time grows with programs × blocks, and each slice
# runs four launches.
@pytest.mark.parametrize("widths,num_levels,dtype", [
    ([11], 1, torch.float32), ([5, 6], 2, torch.bfloat16), ([1, 6, 4], 2, torch.float32),
    ([1, 6, 4], 1, torch.bfloat16),
], ids=str)
def test_phases_on_slices_match_oracle(widths, num_levels, dtype):
    student, teacher, target = _sliced_inputs(len(widths) + num_levels, 6, widths, num_levels, dtype)
    _check_sliced(student, teacher, target, widths, teacher, _level_options(num_levels))


def test_phases_on_slices_multi_block(small_tile):
    """A slice of 45 classes in 32-class blocks, and one of a single class."""
    widths = [45, 1, 6]
    student, teacher, target = _sliced_inputs(7, 6, widths, 2, torch.bfloat16)
    _check_sliced(student, teacher, target, widths, teacher, _level_options(2))


def test_phases_teacher_shared_by_levels():
    """One head at two temperatures (level stride 0): the phases read it in place."""
    student, teacher, target = _sliced_inputs(8, 4, [4, 7], 1, torch.float32)
    shared = teacher.expand(2, -1, -1)
    _check_sliced(student, shared, target, [4, 7], shared, _level_options(2))


def _sliced_top_k(seed, num_rows, widths, k, kind, num_levels, dtype=torch.float32):
    """A TopKTeacher with global indices (level ℓ lists its own classes) as the backends take
    it, its dense teacher, and targets as _sliced_inputs gives them, the last row's listed at level 0."""
    num_classes = sum(widths)
    student, logits, target = _sliced_inputs(seed, num_rows, widths, num_levels, dtype)
    pairs = [top_k(logits[level].cpu(), k, kind) for level in range(num_levels)]
    indices, values = torch.stack([i for i, _ in pairs]), torch.stack([v for _, v in pairs])
    values[:, 1, k // 2:] = -math.inf  # padding
    target[-1] = int(indices[0, -1, 0])
    teacher = TopKTeacher(indices[0] if num_levels == 1 else indices, values[0] if num_levels == 1 else values, kind)
    rows = _kernel_rows(TopKTeacher(teacher.indices.to(DEVICE), teacher.values.to(DEVICE), kind), num_levels,
                        num_rows, num_classes)
    dense = densify(indices, values, kind, num_classes)
    return student, rows, target, dense


@pytest.mark.parametrize("kind,num_levels", [("logits", 1), ("logprobs", 2)])
def test_phases_on_slices_top_k_teacher(kind, num_levels):
    """Listed entries on every slice and off it; level 2 lists its own classes."""
    widths = [1, 6, 4]
    student, rows, target, dense = _sliced_top_k(20 + num_levels, 6, widths, 4, kind, num_levels)
    _check_sliced(student, rows, target, widths, dense, _level_options(num_levels))


def test_phases_on_slices_top_k_multi_block(small_top_k_tiles):
    """32-class blocks and 4-entry steps over K = 5 entries, levels with their own classes."""
    widths = [45, 1, 6]
    student, rows, target, dense = _sliced_top_k(30, 4, widths, 5, "logprobs", 2, torch.bfloat16)
    _check_sliced(student, rows, target, widths, dense, _level_options(2))


def test_phases_top_k_teacher_builds_no_dense_teacher(monkeypatch):
    """The phase kernel's only (N, C_r)-sized tensors are the student slice and, in phase 3,
    its gradient: the top-k teacher arrives as its K entries per row and level."""
    widths = [20, 30]
    student, rows, target, dense = _sliced_top_k(40, 3, widths, 4, "logprobs", 2)
    kernel, seen = triton_backend.triton_kernels.moe_kd_phase_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["PHASE"], [a for a in args if isinstance(a, torch.Tensor)]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_backend.triton_kernels, "moe_kd_phase_kernel", Spy())
    _check_sliced(student, rows, target, widths, dense, _level_options(2))
    assert sorted(phase for phase, _ in seen) == [0, 0, 1, 1, 2, 2, 3, 3]
    for phase, tensors in seen:
        large = {t.data_ptr() for t in tensors if t.numel() >= 3 * min(widths)}
        assert len(large) == (2 if phase == 3 else 1)  # the student slice, and the gradient


def test_phases_float64_student_is_refused_with_its_name():
    phases_impl = BACKENDS["triton"].load_phases()
    student = torch.zeros(3, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="student_logits"):
        phases_impl.check_inputs(student, torch.zeros(1, 3, 5, device=DEVICE))
    phases_impl.check_inputs(student.float(), torch.zeros(1, 3, 5, dtype=torch.float64, device=DEVICE))
