"""fused_linear_moe_kd_loss against the float64 MoE-KD of the materialised logits.

The expected values come from ``oracle.float64_oracle`` on ``hidden @ weight.T + bias``
formed in float64 from the same (rounded) inputs: per-row loss, stats and the logits'
gradient, which the chain rule turns into the gradients of the hidden states, weight
and bias. So every case checks the chunk loop, the GEMMs and the reductions together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moekd_kernels import FusedLinearMoEKDLoss, fused_linear_moe_kd_loss, fused_moe_kd_loss
from moekd_kernels.backends import available_backends
from moekd_kernels.fused_linear import auto_chunk_size
from oracle import TOLERANCE, Case, float64_oracle, rel_err

ROOT = Path(__file__).resolve().parent.parent
HAS_CPU_KERNEL = "cpu" in available_backends("cpu")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the C++ CPU kernel did not build")


def make_inputs(lead=(23,), vocab=29, hidden=12, teacher_hidden=10, *, heads=None, bias=False,
                teacher_bias=False, dtype=torch.float32, ignore_frac=0.25, seed=0):
    """Hidden states and head weights giving logits of scale ~3. ``heads``: None for one
    (V, H_t) teacher weight, else L stacked heads (L, ..., H_t) and (L, V, H_t)."""
    g = torch.Generator().manual_seed(seed)
    pre = () if heads is None else (heads,)
    inputs = {
        "student_hidden": torch.randn(*lead, hidden, generator=g),
        "student_weight": 3 * torch.randn(vocab, hidden, generator=g) / hidden ** 0.5,
        "teacher_hidden": torch.randn(*pre, *lead, teacher_hidden, generator=g),
        "teacher_weight": 3 * torch.randn(*pre, vocab, teacher_hidden, generator=g) / teacher_hidden ** 0.5,
        "student_bias": torch.randn(vocab, generator=g) if bias else None,
        "teacher_bias": torch.randn(*pre, vocab, generator=g) if teacher_bias else None,
    }
    inputs = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    target = torch.randint(0, vocab, lead, generator=g)
    target[torch.rand(lead, generator=g) < ignore_frac] = -100
    inputs["target"] = target
    return inputs


def materialised_logits(inputs, dtype=torch.float64):
    """Student (..., V) and teacher (..., V) or (L, ..., V) logits, formed in ``dtype``."""
    d = {k: (v.detach().to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    student = d["student_hidden"] @ d["student_weight"].T
    if d["student_bias"] is not None:
        student = student + d["student_bias"]
    weight = d["teacher_weight"]
    if weight.dim() == 2:
        teacher = d["teacher_hidden"] @ weight.T
    else:  # (L, ..., H) @ (L, H, V), level by level
        hidden = d["teacher_hidden"]
        teacher = torch.stack([hidden[l] @ weight[l].T for l in range(weight.shape[0])])
    if d["teacher_bias"] is not None:
        bias = d["teacher_bias"]
        teacher = teacher + (bias if bias.dim() == 1 else bias.reshape(bias.shape[0], *[1] * (teacher.dim() - 2),
                                                                       bias.shape[1]))
    return student, teacher


def expected(inputs, options, num_levels_shared=None):
    """Float64 per-row loss, ll, agreement and dloss_row/dlogits (N, V) of the materialised call."""
    student, teacher = materialised_logits(inputs)
    if num_levels_shared is not None:  # one head at several temperatures: L identical levels
        teacher = teacher.unsqueeze(0).expand(num_levels_shared, *teacher.shape)
    loss, grad, ll, agreement = float64_oracle(Case(student, teacher, inputs["target"], dict(options)))
    return loss, grad, ll, agreement


def chain_rule(inputs, grad_logits):
    """Gradients of hidden, weight and bias from the logits' gradient (N, V), in float64."""
    h = inputs["student_hidden"].detach().double().reshape(-1, inputs["student_weight"].shape[1])
    w = inputs["student_weight"].detach().double()
    return (grad_logits @ w).reshape(inputs["student_hidden"].shape), grad_logits.T @ h, grad_logits.sum(0)


def run(inputs, grad_output=None, **kwargs):
    """The fused-linear call with fresh leaves; returns loss, stats, (grad_h, grad_w, grad_b)."""
    leaves = {k: inputs[k].detach().clone().requires_grad_(True)
              for k in ("student_hidden", "student_weight", "student_bias") if inputs[k] is not None}
    call = dict(inputs, **leaves)
    loss, stats = fused_linear_moe_kd_loss(
        call["student_hidden"], call["student_weight"], call["teacher_hidden"], call["teacher_weight"],
        call["target"], student_bias=call["student_bias"], teacher_bias=call["teacher_bias"],
        return_stats=True, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    grads = tuple(leaves[k].grad if k in leaves else None
                  for k in ("student_hidden", "student_weight", "student_bias"))
    return loss, stats, grads


def check(inputs, *, reduction="none", backend="cpu", chunk_size=None, num_items=None,
          num_levels_shared=None, tol=None, seed=1, **options):
    """Run one case and hold loss, stats and the three gradients to the float64 oracle."""
    dtype = inputs["student_weight"].dtype
    tol = TOLERANCE[dtype] if tol is None else tol
    target = inputs["target"]
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        grad_output = torch.rand(target.shape, generator=g, dtype=torch.float64) + 0.5
    else:
        grad_output = torch.tensor(1.7, dtype=torch.float64)
    grad_output = grad_output.float().double()  # exact in every loss dtype
    loss, stats, grads = run(inputs, grad_output, reduction=reduction, backend=backend,
                             chunk_size=chunk_size, num_items_in_batch=num_items, **options)

    exp_rows, exp_grad, exp_ll, exp_agree = expected(inputs, options, num_levels_shared)
    valid = (target.reshape(-1) != options.get("ignore_index", -100))
    if reduction == "none":
        exp_loss = exp_rows.reshape(target.shape)
        row_factor = grad_output.reshape(-1)
    else:
        divisor = {"sum": 1.0, "mean": max(int(valid.sum()), 1)}[reduction]
        if num_items is not None:
            divisor = float(num_items)
        exp_loss = exp_rows.sum() / divisor
        row_factor = torch.full((target.numel(),), float(grad_output) / divisor, dtype=torch.float64)
    exp_grads = chain_rule(inputs, exp_grad * row_factor[:, None])

    assert loss.shape == exp_loss.shape
    assert stats.log_likelihood.shape == target.shape and stats.agreement.shape == target.shape
    errs = {"loss": rel_err(loss, exp_loss), "log_likelihood": rel_err(stats.log_likelihood, exp_ll),
            "agreement": rel_err(stats.agreement, exp_agree)}
    for name, got, want, source in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, exp_grads,
                                       ("student_hidden", "student_weight", "student_bias")):
        if inputs[source] is None:
            continue
        assert got.dtype == inputs[source].dtype and got.shape == inputs[source].shape, name
        errs[name] = rel_err(got, want)
    for name, err in errs.items():
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g} ({dtype}, {backend})"
    return errs


# --------------------------------------------------------------------------- correctness


BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_kernel)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 23, None], ids=["chunk1", "chunk5", "chunkN", "auto"])
def test_one_head_every_chunk_size(backend, chunk_size):
    check(make_inputs(bias=True, teacher_bias=True), backend=backend, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_two_teacher_heads(backend, bias):
    check(make_inputs(lead=(3, 7), heads=2, bias=bias, teacher_bias=bias, seed=2), backend=backend,
          chunk_size=4, temperature=(2.0, 5.0), expert_strength=(1.0, 3.0), level_weights=(1.0, 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_head_at_two_temperatures(backend):
    check(make_inputs(lead=(2, 9), teacher_bias=True, seed=3), backend=backend, chunk_size=5,
          num_levels_shared=2, temperature=(1.0, 4.0), expert_strength=(2.0, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_grad_output_not_one(backend, reduction):
    check(make_inputs(lead=(4, 6), bias=True, seed=4), backend=backend, reduction=reduction, chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [31, torch.tensor(31), torch.tensor(31.0)],
                         ids=["int", "int_tensor", "float_tensor"])
def test_num_items_in_batch_divides_the_sum(backend, num_items):
    check(make_inputs(bias=True, seed=5), backend=backend, reduction="mean", chunk_size=6,
          num_items=num_items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_of_only_ignored_rows(backend):
    inputs = make_inputs(lead=(30,), bias=True, ignore_frac=0.0, seed=6)
    inputs["target"][4:17] = -100      # several whole chunks of 4 rows ignored
    check(inputs, backend=backend, reduction="mean", chunk_size=4)
    check(inputs, backend=backend, reduction="none", chunk_size=4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_gradients(reduction):
    inputs = make_inputs(bias=True, ignore_frac=1.0)
    loss, stats, grads = run(inputs, reduction=reduction, backend="reference", chunk_size=4)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(stats.agreement, torch.zeros_like(stats.agreement))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@needs_cpu_kernel
def test_ignore_index_other_than_default_and_small_integer_target():
    inputs = make_inputs(seed=7, ignore_frac=0.0)
    inputs["target"][::3] = 7
    check(dict(inputs, target=inputs["target"].to(torch.uint8)), chunk_size=5, ignore_index=7)


@needs_cpu_kernel
def test_bf16_weights():
    check(make_inputs(lead=(2, 11), bias=True, dtype=torch.bfloat16, seed=8), reduction="mean", chunk_size=6)


@needs_cpu_kernel
def test_autocast_runs_the_gemms_in_bf16_and_returns_fp32_gradients():
    inputs = make_inputs(lead=(19,), bias=True, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = run(inputs, reduction="sum", backend="cpu", chunk_size=8)
    assert all(g.dtype == torch.float32 for g in grads)
    rounded = {k: (v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v)
               for k, v in inputs.items()}
    exp_rows, exp_grad, _, _ = expected(rounded, {})
    exp_grads = chain_rule(rounded, exp_grad)
    assert rel_err(loss, exp_rows.sum()) <= TOLERANCE[torch.bfloat16]
    for got, want in zip(grads, exp_grads):
        assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]


def test_triton_interpreter_tiny_case():
    if "triton" not in available_backends("cpu"):
        pytest.skip("Triton's interpreter is not usable in this process")
    check(make_inputs(lead=(9,), vocab=20, hidden=8, teacher_hidden=6, bias=True, seed=10),
          backend="triton", reduction="mean", chunk_size=4)


def test_float64_auto_matches_materialised_exactly():
    inputs = make_inputs(bias=True, teacher_bias=True, dtype=torch.float64, seed=11)
    check(inputs, backend="auto", chunk_size=6)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_gets_no_gradient_and_inputs_are_unmodified(reduction):
    inputs = make_inputs(heads=2, bias=True, teacher_bias=True, seed=12)
    inputs = {k: (v.requires_grad_(True) if v is not None and v.is_floating_point() else v)
              for k, v in inputs.items()}
    before = {k: v.detach().clone() for k, v in inputs.items() if v is not None}
    loss = fused_linear_moe_kd_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
        inputs["teacher_weight"], inputs["target"], student_bias=inputs["student_bias"],
        teacher_bias=inputs["teacher_bias"], reduction=reduction, backend="reference", chunk_size=5)
    loss.sum().backward()
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert inputs[name].grad is None, name
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert inputs[name].grad is not None, name
    for name, value in before.items():
        assert torch.equal(inputs[name].detach(), value), f"{name} was modified"


def test_no_grad_gives_the_same_loss_without_a_graph():
    inputs = make_inputs(bias=True, seed=13)
    args = [inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                "target")]
    with_grad = fused_linear_moe_kd_loss(*args, student_bias=inputs["student_bias"], backend="reference")
    leaf = inputs["student_hidden"].detach().requires_grad_(True)
    with torch.no_grad():
        without = fused_linear_moe_kd_loss(leaf, *args[1:], student_bias=inputs["student_bias"],
                                           backend="reference")
    assert without.grad_fn is None
    assert torch.equal(with_grad, without)


def test_only_the_parameters_that_require_grad_get_one():
    inputs = make_inputs(bias=True, seed=14)
    weight = inputs["student_weight"].detach().requires_grad_(True)
    loss = fused_linear_moe_kd_loss(inputs["student_hidden"], weight, inputs["teacher_hidden"],
                                    inputs["teacher_weight"], inputs["target"],
                                    student_bias=inputs["student_bias"], backend="reference")
    (grad,) = torch.autograd.grad(loss, (weight,))
    exp_rows, exp_grad, _, _ = expected(inputs, {})
    valid = int((inputs["target"] != -100).sum())
    assert rel_err(grad, chain_rule(inputs, exp_grad / valid)[1]) <= 1e-5


def test_equals_the_logits_api_in_float32():
    """Same numbers as fused_moe_kd_loss on float32 logits formed by the same GEMM."""
    inputs = make_inputs(lead=(3, 5), bias=True, seed=15)
    loss, stats, grads = run(inputs, backend="reference", reduction="mean", chunk_size=4)
    h = inputs["student_hidden"].detach().requires_grad_(True)
    w = inputs["student_weight"].detach().requires_grad_(True)
    b = inputs["student_bias"].detach().requires_grad_(True)
    _, teacher = materialised_logits(inputs, torch.float32)
    ref = fused_moe_kd_loss(h @ w.T + b, teacher, inputs["target"], backend="reference")
    ref.backward()
    assert rel_err(loss, ref.detach()) <= 1e-6
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        assert rel_err(got, want) <= 1e-5


def test_module_form_equals_function_and_takes_num_items_per_call():
    inputs = make_inputs(bias=True, seed=16)
    args = [inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                "target")]
    criterion = FusedLinearMoEKDLoss(temperature=2.0, expert_strength=1.0, backend="reference", chunk_size=5)
    assert "temperature=2.0" in repr(criterion)
    expect = fused_linear_moe_kd_loss(*args, student_bias=inputs["student_bias"], temperature=2.0,
                                      expert_strength=1.0, backend="reference", chunk_size=5)
    assert torch.equal(criterion(*args, student_bias=inputs["student_bias"]), expect)
    summed = fused_linear_moe_kd_loss(*args, temperature=2.0, expert_strength=1.0, reduction="sum",
                                      backend="reference", chunk_size=5)
    per_call = criterion(*args, num_items_in_batch=40)
    assert torch.allclose(per_call, summed / 40, rtol=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_fullgraph_equals_eager(reduction):
    inputs = make_inputs(lead=(2, 9), heads=2, bias=True, seed=17)

    def loss_fn(hidden, weight, bias):
        return fused_linear_moe_kd_loss(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"],
                                        inputs["target"], student_bias=bias, reduction=reduction,
                                        backend="cpu", chunk_size=4, temperature=(1.0, 3.0))

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaves = [inputs[k].detach().clone().requires_grad_(True)
                  for k in ("student_hidden", "student_weight", "student_bias")]
        loss = fn(*leaves)
        loss.backward(torch.full_like(loss, 1.3))
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises_instead_of_dropping_the_second_order_term(reduction):
    inputs = make_inputs(bias=True, seed=18)
    hidden = inputs["student_hidden"].detach().requires_grad_(True)
    loss = fused_linear_moe_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                    inputs["teacher_weight"], inputs["target"], reduction=reduction,
                                    backend="reference")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), hidden, create_graph=True)


def test_auto_chunk_size_follows_the_budget():
    # CPU: 128 MiB / (V · (2·4 + 1·4) bytes) rows, down to a multiple of 64.
    assert auto_chunk_size(100_000, 32768, torch.float32, torch.float32, 1, "cpu") == 320
    # bf16 student, fp32 teacher at 2 heads: 128 MiB / (65536 · (2·2 + 2·4)) = 170 → 128.
    assert auto_chunk_size(100_000, 65536, torch.bfloat16, torch.float32, 2, "cpu") == 128
    # CUDA: 1 GiB / (131072 · (2·2 + 2)) = 1365 → 1344.
    assert auto_chunk_size(None, 131072, torch.bfloat16, torch.bfloat16, 1, "cuda") == 1344
    assert auto_chunk_size(100, 32768, torch.float32, torch.float32, 1, "cpu") == 100
    assert auto_chunk_size(10, 1 << 27, torch.float32, torch.float32, 1, "cpu") == 1


# --------------------------------------------------------------------------- bad arguments


def _args(**override):
    inputs = make_inputs(bias=True)
    args = {k: inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                   "target")}
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    ({"student_weight": torch.randn(29, 11)}, ValueError, "student_hidden must have shape"),
    ({"student_weight": torch.randn(29)}, ValueError, "student_weight must have shape"),
    ({"teacher_weight": torch.randn(30, 10)}, ValueError, "teacher_weight must have V=29"),
    ({"teacher_hidden": torch.randn(22, 10)}, ValueError, "teacher_hidden must have shape"),
    ({"teacher_weight": torch.randn(2, 29, 10)}, ValueError, r"teacher_hidden must have shape \(2, 23, 10\)"),
    ({"target": torch.zeros(22, dtype=torch.long)}, ValueError, "target must have shape"),
    ({"target": torch.zeros(23)}, TypeError, "target must be an integer tensor"),
    ({"student_hidden": torch.randn(23, 12, dtype=torch.float64)}, TypeError, "one dtype"),
    ({"student_hidden": torch.zeros(23, 12, dtype=torch.long)}, TypeError, "student_hidden must be a floating"),
    ({"teacher_weight": [[1.0]]}, TypeError, "teacher_weight must be a torch.Tensor"),
])
def test_bad_tensors_name_the_argument(override, error, match):
    args = _args(**override)
    with pytest.raises(error, match=match):
        fused_linear_moe_kd_loss(*args.values(), backend="reference")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"student_bias": torch.randn(28)}, ValueError, "student_bias must have shape"),
    ({"teacher_bias": torch.randn(2, 29)}, ValueError, "teacher_bias must have shape"),
    ({"student_bias": torch.randn(29, dtype=torch.float64)}, TypeError, "student_bias must have"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": 2.5}, TypeError, "num_items_in_batch"),
    ({"num_items_in_batch": torch.ones(2)}, TypeError, "num_items_in_batch"),
    ({"num_items_in_batch": torch.tensor(0)}, ValueError, "num_items_in_batch must be > 0"),
    ({"num_items_in_batch": torch.tensor(float("inf"))}, ValueError, "num_items_in_batch must be > 0"),
    ({"num_items_in_batch": 4, "reduction": "none"}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": 4, "reduction": "sum"}, ValueError, "num_items_in_batch"),
    ({"temperature": (1.0, 2.0), "expert_strength": (1.0, 2.0, 3.0)}, ValueError, "expert_strength"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"process_group": "world"}, TypeError, "process_group must be a torch.distributed ProcessGroup"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_linear_moe_kd_loss(*_args().values(), **{"backend": "reference", **kwargs})


def test_out_of_range_target_raises():
    args = _args()
    args["target"] = args["target"].clone()
    args["target"][0] = 29
    with pytest.raises(ValueError, match=r"target values must be in \[0, 29\)"):
        fused_linear_moe_kd_loss(*args.values(), backend="reference")


# --------------------------------------------------------------------------- memory


@needs_cpu_kernel
def test_peak_memory_stays_at_chunk_size_not_n_by_v():
    """N=4096, V=32768, H=64, fp32, chunk_size=256, in a fresh process: the peak extra RSS
    must stay near the chunk's buffers (formula) plus the returned gradients, far below
    one N×V float32 buffer (512 MiB), let alone the ~3 the materialised path holds."""
    rows, vocab, hidden, chunk = 4096, 32768, 64, 256
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from fused_linear_memory import measure
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = measure("fused_linear", "fp32", rows, vocab, hidden, chunk_size=chunk, backend="cpu",
                     warmup_rows=64)
    chunk_buffers = chunk * vocab * (2 * 4 + 4)           # student logits, their gradient, teacher logits
    gradients = vocab * hidden * 4 + rows * hidden * 4     # grad_weight (fp32 accumulator) and grad_hidden
    bound = chunk_buffers + gradients + (32 << 20)         # + allocator and GEMM workspace slack
    assert result["peak_extra_bytes"] <= bound, json.dumps(result)
    assert bound < 0.3 * rows * vocab * 4
