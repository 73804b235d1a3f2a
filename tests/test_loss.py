"""The public API and the autograd glue, exercised through the reference backend."""

import inspect

import pytest
import torch

from moekd_kernels import MoEKDLoss, MoEKDStats, available_backends, fused_moe_kd_loss
from oracle import DEFAULT_OPTIONS, Case, check_backend, make_case, naive_oracle, rel_err

SPEC_DEFAULTS = {**DEFAULT_OPTIONS, "reduction": "mean", "backend": "auto", "return_stats": False,
                 "process_group": None}


def test_signature_and_defaults_match_between_functional_and_module():
    functional = inspect.signature(fused_moe_kd_loss).parameters
    assert list(functional)[:3] == ["student_logits", "teacher_logits", "target"]
    assert {k: p.default for k, p in functional.items() if k in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert all(functional[k].kind is inspect.Parameter.KEYWORD_ONLY for k in SPEC_DEFAULTS)
    module = inspect.signature(MoEKDLoss.__init__).parameters
    assert {k: p.default for k, p in module.items() if k != "self"} == SPEC_DEFAULTS
    # num_items_in_batch changes with every batch: a keyword of the call, not of the module.
    forward = inspect.signature(MoEKDLoss.forward).parameters
    assert list(forward)[1:] == ["student_logits", "teacher_logits", "target", "num_items_in_batch"]
    for params in (functional, forward):
        assert params["num_items_in_batch"].default is None
        assert params["num_items_in_batch"].kind is inspect.Parameter.KEYWORD_ONLY


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
def test_second_backward_through_the_same_loss_says_to_recompute_it(factor):
    student = torch.randn(3, 4, requires_grad=True)
    loss = factor * fused_moe_kd_loss(student, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    message = str(info.value)
    # Says what happened (the saved gradient was consumed, scaled in place), what is not
    # supported, and what to do; not PyTorch's bare version-counter error.
    assert message.startswith("moekd_kernels:") and "modified by an inplace operation" not in message
    for part in ("twice", "consumed", "in place", "retain_graph=True is not supported",
                 "recompute the loss"):
        assert part in message, part


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


# ---------------------------------------------------------------------------------
# num_items_in_batch: Hugging Face / TRL gradient accumulation
# ---------------------------------------------------------------------------------

def _loss_and_grad(student, teacher, target, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    loss = fused_moe_kd_loss(leaf, teacher, target, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch_divides_the_summed_loss(backend, as_tensor):
    case = make_case(10, 12, 2, seed=21, ignore_frac=0.3, temperature=[1.0, 3.0])
    num_items = 17  # e.g. the token count of this micro-batch and the next
    given = torch.tensor(num_items) if as_tensor else num_items
    loss, grad = _loss_and_grad(case.student, case.teacher, case.target, backend=backend,
                                num_items_in_batch=given, **case.options)
    exp_loss, exp_grad, _, _ = naive_oracle(case)
    assert rel_err(loss, exp_loss.sum() / num_items) <= 1e-5
    assert rel_err(grad, exp_grad / num_items) <= 1e-5
    # ... which is reduction="sum" divided by it.
    summed, summed_grad = _loss_and_grad(case.student, case.teacher, case.target, backend=backend,
                                         reduction="sum", **case.options)
    assert rel_err(loss, summed / num_items) <= 1e-6 and rel_err(grad, summed_grad / num_items) <= 1e-6


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_gradient_accumulation_with_num_items_equals_the_full_batch_mean(backend):
    """Two micro-batches with num_items_in_batch = the valid rows of both, their gradients
    summed (what a trainer accumulates), equal one step over the whole batch with "mean"."""
    case = make_case(12, 9, 1, seed=22, ignore_frac=0.3)
    total = int((case.target != -100).sum())
    module = MoEKDLoss(backend=backend)
    leaf = case.student.detach().clone().requires_grad_(True)
    accumulated = 0.0
    for rows in (slice(0, 5), slice(5, 12)):       # micro-batches of unequal valid counts
        loss = module(leaf[rows], case.teacher[rows], case.target[rows],
                      num_items_in_batch=torch.tensor(total))
        loss.backward()
        accumulated = accumulated + loss.detach()
    full, full_grad = _loss_and_grad(case.student, case.teacher, case.target, backend=backend)
    assert rel_err(accumulated, full) <= 1e-6
    assert rel_err(leaf.grad, full_grad) <= 1e-6


BAD_NUM_ITEMS = [
    (0, {}, ValueError, r"num_items_in_batch must be > 0.*got 0"),
    (-3, {}, ValueError, r"num_items_in_batch must be > 0.*got -3"),
    (True, {}, TypeError, r"num_items_in_batch must be an int or a 0-dim tensor, got True"),
    (2.5, {}, TypeError, r"num_items_in_batch must be an int or a 0-dim tensor, got 2.5"),
    (torch.tensor([4]), {}, TypeError, r"num_items_in_batch must be .*0-dim.*shape \(1,\)"),
    (torch.tensor(0), {}, ValueError, r"num_items_in_batch must be > 0.*got 0"),
    (torch.tensor(float("nan")), {}, ValueError, r"num_items_in_batch must be > 0.*got nan"),
    (8, {"reduction": "none"}, ValueError, r"num_items_in_batch .*reduction='mean'.*reduction='none'"),
    (8, {"reduction": "sum"}, ValueError, r"num_items_in_batch .*reduction='mean'.*reduction='sum'"),
]


@pytest.mark.parametrize("value, kwargs, error, pattern", BAD_NUM_ITEMS, ids=str)
def test_bad_num_items_in_batch_is_named(value, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        fused_moe_kd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]),
                          num_items_in_batch=value, **kwargs)


def test_num_items_tensor_off_the_cpu_is_never_read_on_the_host():
    """A meta tensor has no value to read: any .item() / bool() on it would raise. On a GPU
    the same path divides on the device without a sync."""
    student = torch.empty(4, 6, device="meta", requires_grad=True)
    teacher, target = torch.empty(4, 6, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    loss = fused_moe_kd_loss(student, teacher, target, backend="reference",
                             num_items_in_batch=torch.empty((), dtype=torch.long, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"


# ---------------------------------------------------------------------------------
# One teacher head at several temperatures
# ---------------------------------------------------------------------------------

SHARED_OPTIONS = [
    dict(temperature=(1.0, 4.0)),
    dict(expert_strength=[0.5, 3.0], level_weights=[2.0, 1.0]),
    dict(temperature=[1.0, 2.0, 8.0], expert_strength=[1.0, 2.0, 0.0], level_weights=[1.0, 1.0, 2.0]),
]


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("options", SHARED_OPTIONS, ids=["tau", "beta-weights", "all"])
def test_one_teacher_head_with_per_level_options_is_that_many_levels(backend, options):
    case = make_case(0, 11, 1, seed=23, lead_shape=(2, 4))
    num_levels = max(len(v) for v in options.values())
    stacked = Case(case.student, torch.stack([case.teacher] * num_levels), case.target, options)

    def per_row(teacher):
        student = case.student.clone().requires_grad_(True)
        loss, stats = fused_moe_kd_loss(student, teacher, case.target, reduction="none", backend=backend,
                                        return_stats=True, **options)
        loss.sum().backward()
        return loss.detach(), student.grad, stats.log_likelihood, stats.agreement

    got = per_row(case.teacher)
    # The same numbers as the call on the teacher stacked L times ...
    for a, b in zip(got, per_row(stacked.teacher)):
        assert torch.equal(a, b)
    # ... and as the float64 oracle of that stacked call.
    exp_loss, exp_grad, exp_ll, exp_agreement = naive_oracle(stacked)
    for a, b in zip(got, (exp_loss, exp_grad, exp_ll, exp_agreement)):
        assert rel_err(a, b) <= 1e-5


def test_shared_teacher_head_reaches_the_backend_as_a_stride_0_view(monkeypatch):
    """No copy: the backend reads the caller's teacher memory at every level."""
    from moekd_kernels import backends

    seen = []
    original = backends.Backend.forward

    def spy(self, *args):
        seen.append(args[1])
        return original(self, *args)

    monkeypatch.setattr(backends.Backend, "forward", spy)
    case = make_case(0, 7, 1, seed=24, lead_shape=(3, 5))
    fused_moe_kd_loss(case.student, case.teacher, case.target, temperature=[1.0, 2.0, 4.0],
                      backend="reference")
    (teacher,) = seen
    assert teacher.shape == (3, 15, 7) and teacher.stride()[0] == 0
    assert teacher.data_ptr() == case.teacher.data_ptr()


def test_shared_head_and_option_lengths_must_agree():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"expert_strength must have one value per level like temperature "
                                         r"\(L=2\), got a sequence of length 3"):
        fused_moe_kd_loss(s, s, torch.tensor([0, 1, 2]), temperature=[1.0, 2.0],
                          expert_strength=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------
# No gradient pass when no gradient is needed
# ---------------------------------------------------------------------------------

@pytest.fixture
def backend_calls(monkeypatch):
    """need_grad of every backend call, and whether a gradient came back."""
    from moekd_kernels import backends

    calls = []
    original = backends.Backend.forward

    def spy(self, *args):
        out = original(self, *args)
        calls.append((args[5], out[3] is not None))
        return out

    monkeypatch.setattr(backends.Backend, "forward", spy)
    return calls


NO_GRAD_CONTEXTS = {
    "no_grad": lambda s: (torch.no_grad(), s.requires_grad_(True)),
    "inference_mode": lambda s: (torch.inference_mode(), s.requires_grad_(True)),
    "student_without_grad": lambda s: (torch.enable_grad(), s),
}


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("context", list(NO_GRAD_CONTEXTS))
def test_no_gradient_pass_when_none_is_needed(backend_calls, backend, context):
    case = make_case(6, 10, 2, seed=25)
    manager, student = NO_GRAD_CONTEXTS[context](case.student.clone())
    with manager:
        loss, stats = fused_moe_kd_loss(student, case.teacher, case.target, reduction="none",
                                        backend=backend, return_stats=True)
    assert backend_calls == [(False, False)]
    want, want_stats = fused_moe_kd_loss(case.student.clone().requires_grad_(True), case.teacher,
                                         case.target, reduction="none", backend=backend, return_stats=True)
    assert backend_calls[1] == (True, True)
    assert torch.equal(loss, want.detach()) and torch.equal(stats.agreement, want_stats.agreement)
    assert not loss.requires_grad


@pytest.mark.parametrize("backend, rows, bound", [("reference", 256, 3.0), ("cpu", 1024, 0.25)])
def test_no_grad_call_adds_little_to_peak_memory(backend, rows, bound):
    """Issue targets at N=1024, C=32768 fp32, measured as peak RSS in a fresh process:
    'reference' < 3 N×C float32 buffers, 'cpu' < 0.25 (no gradient buffer at all). The
    reference is checked at N=256 to stay fast: its temporaries are a fixed row block,
    so a smaller N is the stricter ratio."""
    import importlib.util
    from pathlib import Path

    from moekd_kernels.backends import BACKENDS

    if BACKENDS[backend].unavailable_reason("cpu") is not None:
        pytest.fail(f"backend {backend!r} must be usable here: {BACKENDS[backend].unavailable_reason('cpu')}")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peak_memory.py"
    spec = importlib.util.spec_from_file_location("peak_memory", path)
    peak_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak_memory)
    result = peak_memory.measure(backend, "fp32", rows, 32768, no_grad=True)
    assert result["fp32_buffers"] < bound, result


# ---------------------------------------------------------------------------------
# First-order only: double backward is refused, never silently wrong
# ---------------------------------------------------------------------------------

def test_gradient_penalty_through_the_loss_raises_a_clear_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    x = torch.randn(4, 6, requires_grad=True)
    loss = fused_moe_kd_loss(model(x), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), backend="reference")
    with pytest.raises(RuntimeError) as info:
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        grad_x.pow(2).sum().backward()
    message = str(info.value)
    assert "first-order gradient only" in message and "create_graph=True" in message
    # The first-order gradient itself is still there without create_graph.
    (grad_x,) = torch.autograd.grad(
        fused_moe_kd_loss(model(x), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), backend="reference"), x)
    assert torch.isfinite(grad_x).all()
