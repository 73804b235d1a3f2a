"""The op glue (moekd_kernels/ops.py) under torch.compile and autograd, for every backend.

A training step — a small nn.Linear student, fused_moe_kd_loss, backward,
optimizer step — must trace as one graph (fullgraph=True, no graph break) and
give the eager loss, gradients and parameters. Most cases compile with the
"aot_eager" backend (Dynamo + fake tensors + AOTAutograd, which is where a
graph break or a bad fake implementation shows); one case goes through
Inductor.
"""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from moekd_kernels import fused_moe_kd_loss
from moekd_kernels.backends import BACKENDS
from moekd_kernels import ops, scaling
from moekd_kernels.ops import moe_kd_loss
from oracle import rel_err

HAS_CUDA = torch.cuda.is_available()
CASES = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
         ("reference", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]
OPTIONS = dict(temperature=[2.0, 3.0], expert_strength=[1.0, 2.5], level_weights=[1.0, 3.0],
               gate_weight=0.7, expert_weight=1.2)


def _available(backend, device):
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device"
    return BACKENDS[backend].unavailable_reason(device)


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    backend, device = request.param
    reason = _available(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")
    torch._dynamo.reset()
    return backend, device


def _batch(num_rows, device, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 16, generator=g)
    teacher = 3 * torch.randn(2, num_rows, num_classes, generator=g)
    target = torch.randint(0, num_classes, (num_rows,), generator=g)
    target[::4] = -100
    return x.to(device), teacher.to(device), target.to(device)


def _student(device, num_classes=10):
    torch.manual_seed(0)
    return nn.Linear(16, num_classes).to(device)


def _loss_fn(backend, reduction="mean"):
    def loss_fn(model, x, teacher, target):
        return fused_moe_kd_loss(model(x), teacher, target, backend=backend, reduction=reduction,
                                 return_stats=True, **OPTIONS)
    return loss_fn


def _train_and_compare(loss_fn, compiled, device, tol):
    eager_model = _student(device)
    compiled_model = copy.deepcopy(eager_model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager_model, compiled_model)]
    # Two steps at different batch sizes: the second one goes through the fake
    # implementation with a new (or symbolic) number of rows.
    for step, num_rows in enumerate((8, 13)):
        batch = _batch(num_rows, device, seed=step)
        results = []
        for fn, model, opt in ((loss_fn, eager_model, optimizers[0]),
                               (compiled, compiled_model, optimizers[1])):
            opt.zero_grad()
            loss, stats = fn(model, *batch)
            loss.backward()
            results.append((loss.detach(), stats, [p.grad.clone() for p in model.parameters()]))
            opt.step()
        (loss_e, stats_e, grads_e), (loss_c, stats_c, grads_c) = results
        assert rel_err(loss_c, loss_e) <= tol
        assert rel_err(stats_c.log_likelihood, stats_e.log_likelihood) <= tol
        assert rel_err(stats_c.agreement, stats_e.agreement) <= tol
        for g_c, g_e in zip(grads_c, grads_e):
            assert rel_err(g_c, g_e) <= tol
    for p_c, p_e in zip(compiled_model.parameters(), eager_model.parameters()):
        assert rel_err(p_c, p_e) <= tol


def test_training_step_traces_as_one_graph(case):
    backend, device = case
    loss_fn = _loss_fn(backend)
    explanation = torch._dynamo.explain(loss_fn)(_student(device), *_batch(8, device))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager(case):
    backend, device = case
    loss_fn = _loss_fn(backend)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    _train_and_compare(loss_fn, compiled, device, tol=1e-6)


def test_inductor_training_step_matches_eager():
    """The real compiler once: the reference on CPU, or Triton on a GPU."""
    backend, device = ("triton", "cuda") if HAS_CUDA else ("reference", "cpu")
    torch._dynamo.reset()
    loss_fn = _loss_fn(backend)
    compiled = torch.compile(loss_fn, fullgraph=True)
    _train_and_compare(loss_fn, compiled, device, tol=1e-5)


def _student_logits(device, num_rows=8, num_classes=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(num_rows, num_classes, generator=g)).to(device).requires_grad_(True)


def _per_row(backend, reduction):
    def fn(student, teacher, target):
        return fused_moe_kd_loss(student, teacher, target, backend=backend, reduction=reduction,
                                 **OPTIONS)
    return fn


@pytest.mark.parametrize("factor", [1.0, 2.0])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_second_backward_is_never_silently_rescaled(case, compiled, factor):
    """The glue scales the saved gradient in place (a factor of 1 included: the kernel
    decides on the device to skip it): eager autograd must refuse a second backward, in
    the library's words; a compiled graph (functionalised backward) may instead return
    the right gradient again. Never a twice-scaled one."""
    backend, device = case
    fn = _per_row(backend, "mean")
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _, teacher, target = _batch(8, device)
    student = _student_logits(device)
    loss = factor * fn(student, teacher, target) if factor != 1.0 else fn(student, teacher, target)
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    if not compiled:
        with pytest.raises(RuntimeError, match="retain_graph=True is not supported.*recompute the loss"):
            loss.backward()
        return
    try:
        loss.backward()
    except RuntimeError as exc:
        assert "recompute the loss" in str(exc) or "inplace" in str(exc)
    else:
        assert rel_err(student.grad, 2 * first) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_doubling_the_loss_doubles_the_gradient(case, reduction, compiled):
    backend, device = case
    fn = _per_row(backend, reduction)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _, teacher, target = _batch(8, device)
    grads = []
    for scale in (1.0, 2.0):
        student = _student_logits(device)
        (scale * fn(student, teacher, target)).backward()
        grads.append(student.grad)
    assert rel_err(grads[1], 2 * grads[0]) <= 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reduction_none_scales_each_row_by_its_grad_output(case, compiled):
    backend, device = case
    fn = _per_row(backend, "none")
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _, teacher, target = _batch(8, device)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, 1.0, -0.25, 4.0], device=device)
    student = _student_logits(device)
    fn(student, teacher, target).backward(torch.ones(8, device=device))
    unweighted = student.grad
    student = _student_logits(device)
    fn(student, teacher, target).backward(weights)
    assert rel_err(student.grad, unweighted * weights[:, None]) <= 1e-6
    assert (student.grad[3] == 0).all() and (unweighted[target == -100] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fake_implementation_agrees_with_the_kernels(dtype, reduction):
    """Schema, autograd registration and fake tensors, checked by torch.library.opcheck."""
    student = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    args = (student, torch.randn(2, 5, 7), torch.tensor([0, 1, -100, 3, 6]), [2.0, 3.0], [1.0, 2.0],
            [0.5, 0.5], 1.0, 1.0, -100, "reference", reduction)
    results = torch.library.opcheck(
        moe_kd_loss, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_saved_gradient_is_the_gradient_of_the_returned_loss(case, reduction):
    """The op's gradient output is already d(loss)/d(student) for its reduction ("mean"
    folds 1/n_valid into the kernel), so loss.backward() leaves it as it is."""
    backend, device = case
    _, teacher, target = _batch(8, device)
    student = torch.randn(8, 10, device=device)
    leaf = student.clone().requires_grad_(True)
    loss, _, _, raw = moe_kd_loss(leaf, teacher, target, [2.0, 3.0], [1.0, 2.5], [0.25, 0.75], 0.7, 1.2,
                                  -100, backend, reduction)
    assert loss.shape == ((8,) if reduction == "none" else ())
    (loss.sum() if reduction == "none" else loss).backward()
    assert torch.equal(leaf.grad, raw)
    per_row = fused_moe_kd_loss(student, teacher, target, reduction="none", backend="reference", **OPTIONS)
    num_valid = int((target != -100).sum())
    expected_loss = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / num_valid}[reduction]
    assert rel_err(loss.detach(), expected_loss.detach()) <= 1e-6


def test_compiled_graph_may_return_the_raw_gradient_output():
    torch._dynamo.reset()
    teacher, target = torch.randn(2, 5, 7), torch.tensor([0, 1, -100, 3, 6])

    def fn(student):
        loss, _, _, grad = moe_kd_loss(student, teacher, target, [2.0, 3.0], [1.0, 2.0], [0.5, 0.5],
                                       1.0, 1.0, -100, "reference", "sum")
        return loss, grad

    student = torch.randn(5, 7, requires_grad=True)
    loss, raw_grad = torch.compile(fn, fullgraph=True, backend="aot_eager")(student)
    loss.backward()
    # The returned buffer is the gradient of the summed loss; backward scaled by 1 gives the same.
    torch.testing.assert_close(student.grad, raw_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_backward_traces_when_the_compile_flag_is_not_set(monkeypatch, compiler):
    """Some torch versions (2.11 on the H100) trace backward with is_compiling() False:
    the in-place scaling must then trace too (a registered op with a fake), and give the
    eager gradient."""
    monkeypatch.setattr(ops, "_compiling", lambda: False)
    torch._dynamo.reset()
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    target = torch.tensor([0, 1, -100, 3, 4, -100, 6, 7])

    def fn(s):
        return 3.0 * fused_moe_kd_loss(s, teacher, target, backend="reference")

    eager = student.clone().requires_grad_(True)
    fn(eager).backward()
    compiled = student.clone().requires_grad_(True)
    torch.compile(fn, fullgraph=True, backend=compiler)(compiled).backward()
    assert rel_err(compiled.grad, eager.grad) <= 1e-6


def test_dynamic_compile_of_a_training_step_compiles_once_and_matches_eager(case):
    """torch.compile(dynamic=True, fullgraph=True), as trainers with variable sequence lengths
    use it: the options (module attributes, per-level lists) reach the option checks as
    symbolic floats; three lengths give one graph, no recompile, and the eager numbers."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from moekd_kernels import MoEKDLoss

    backend, device = case
    criterion = MoEKDLoss(backend=backend, **OPTIONS)

    def step(model, x, teacher, target):
        return criterion(model(x), teacher, target)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend=counter)
    counters.clear()
    eager_model = _student(device)
    compiled_model = copy.deepcopy(eager_model)
    frames_after_first = None
    for step_index, num_rows in enumerate((8, 13, 21)):
        batch = _batch(num_rows, device, seed=step_index)
        results = []
        for fn, model in ((step, eager_model), (compiled, compiled_model)):
            model.zero_grad()
            loss = fn(model, *batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss_e, grads_e), (loss_c, grads_c) = results
        assert rel_err(loss_c, loss_e) <= 1e-6
        for g_c, g_e in zip(grads_c, grads_e):
            assert rel_err(g_c, g_e) <= 1e-6
        frames_after_first = frames_after_first or counter.frame_count
    assert counters["stats"]["unique_graphs"] == 1
    assert counter.frame_count == frames_after_first  # no recompile for a new length
    assert not counters["recompiles"]


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton")
                                     if _available(b, "cpu") is None])
def test_out_of_range_target_raises_the_eager_error_when_compiled(backend):
    """The check runs in the op's body, which runs eagerly inside the compiled graph."""
    torch._dynamo.reset()
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    fn = _per_row(backend, "mean")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled(student, teacher, torch.tensor([0, 1, -100, 5]))        # traced with a valid target
    for bad in (torch.tensor([0, 6, 1, 2]), torch.tensor([0, -1, 1, 2])):
        with pytest.raises(ValueError) as eager:
            fn(student, teacher, bad)
        with pytest.raises(ValueError) as traced:
            compiled(student, teacher, bad)
        assert str(traced.value) == str(eager.value)
        assert "target values must be in [0, 6)" in str(traced.value)


def test_compiled_call_under_no_grad_skips_the_gradient_and_matches_eager(backend_need_grad):
    torch._dynamo.reset()
    _, teacher, target = _batch(8, "cpu")
    student = _student_logits("cpu")
    fn = _per_row("reference", "none")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(student, teacher, target)
        want = fn(student, teacher, target)
    assert torch.equal(got, want) and set(backend_need_grad) == {False}


@pytest.fixture
def backend_need_grad(monkeypatch):
    from moekd_kernels import backends

    calls = []
    forward = backends.Backend.forward

    def spy(self, *args):
        calls.append(args[5])
        return forward(self, *args)

    monkeypatch.setattr(backends.Backend, "forward", spy)
    return calls


@pytest.mark.parametrize("need_grad", [True, False])
def test_fake_implementation_agrees_without_a_gradient_and_with_num_items(need_grad):
    student = torch.randn(5, 7, requires_grad=need_grad)
    args = (student, torch.randn(2, 5, 7), torch.tensor([0, 1, -100, 3, 6]), [2.0, 3.0], [1.0, 2.0],
            [0.5, 0.5], 1.0, 1.0, -100, "reference", "mean", need_grad, torch.tensor(9.0))
    results = torch.library.opcheck(
        moe_kd_loss, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}
    _, _, _, grad = moe_kd_loss(*args)
    assert grad.shape == ((5, 7) if need_grad else (0,))


def test_the_op_glue_does_not_import_a_kernel_backend():
    """ops.py is generic glue: it reaches kernels only through the backend registry (the
    Triton row scaling lives in scaling.py). Any import statement counts, lazy ones too."""
    import ast
    import inspect

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(ops))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not [m for m in imported if m.endswith("_backend") or "triton" in m], imported
    assert ops.scale_rows_ is scaling.scale_rows_
