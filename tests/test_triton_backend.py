"""Backend "triton" against the float64 oracle.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before anything imports
Triton, and the kernel runs on CPU tensors under Triton's interpreter. With a
GPU the same tests run the compiled kernel on CUDA tensors.
"""

import math
import os

import pytest
import torch

from moekd_kernels import fused_moe_kd_loss
from moekd_kernels import triton_backend
from moekd_kernels.backends import BACKENDS, resolve_backend
from moekd_kernels.options import resolve_options
from oracle import Case, check_backend, classic_kd, float64_oracle, make_case, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = BACKENDS["triton"].unavailable_reason(DEVICE)
# Only a missing Triton skips. With Triton installed (CI installs it), a broken
# TRITON_INTERPRET setup must fail, and test_interpreter_is_effective says why.
pytestmark = pytest.mark.skipif(triton_backend._IMPORT_ERROR is not None,
                                reason=f"backend 'triton': {_REASON}")

# The largest single-block row for L = 1: BLOCK + 1 classes take the multi-block path.
BLOCK = triton_backend.TILES[DEVICE].single
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _opts(num_levels, **options):
    defaults = dict(temperature=4.0, expert_strength=2.0, level_weights=None, gate_weight=1.0,
                    expert_weight=1.0, ignore_index=-100)
    return resolve_options(num_levels, **{**defaults, **options})


def _check_rows(out, case, tol):
    """Backend-level outputs (loss, ll, agreement, grad) against the float64 oracle."""
    loss, ll, agreement, grad = out
    exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(case)
    errs = {"loss": rel_err(loss, exp_loss), "grad": rel_err(grad, exp_grad),
            "log_likelihood": rel_err(ll, exp_ll), "agreement": rel_err(agreement, exp_agree)}
    for name, err in errs.items():
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g}"
    return errs


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
    expected = _check_rows(plain, case, 3e-2 if dtype == torch.bfloat16 else 1e-5)
    assert expected is not None
    ref = triton_backend.forward(case.student.float(), teacher.float(), case.target, opts)[3]
    torch.testing.assert_close(scaled[3].float(), (ref * factor).to(dtype).float(), rtol=2.0 ** -7, atol=1e-12)
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
