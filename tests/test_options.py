"""Every bad argument raises before any kernel runs, naming the argument."""

import math

import pytest
import torch

from moekd_kernels import MoEKDLoss, available_backends, fused_moe_kd_loss
from moekd_kernels.options import (MAX_EXPERT_STRENGTH, MAX_TEMPERATURE, MAX_TERM_WEIGHT,
                                   MIN_TEMPERATURE, flatten_inputs, resolve_options)
from oracle import check_backend, make_case

N, C = 4, 5


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, C, generator=g), torch.randn(N, C, generator=g), torch.tensor([0, 1, 2, -100])


BAD_OPTIONS = [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": math.inf}, ValueError, "temperature"),
    ({"temperature": math.nan}, ValueError, "temperature"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"temperature": [1.0, 2.0], "expert_strength": [1.0, 2.0, 3.0]}, ValueError, "expert_strength"),
    ({"temperature": 1e-5}, ValueError, "temperature"),
    ({"temperature": 1e5}, ValueError, "temperature"),
    ({"expert_strength": -0.5}, ValueError, "expert_strength"),
    ({"expert_strength": MAX_EXPERT_STRENGTH + 1}, ValueError, "expert_strength"),
    ({"expert_strength": math.nan}, ValueError, "expert_strength"),
    ({"level_weights": [-1.0]}, ValueError, "level_weights"),
    ({"level_weights": [0.0]}, ValueError, "level_weights"),
    ({"level_weights": [1.0, 1.0], "temperature": [1.0, 2.0, 3.0]}, ValueError, "level_weights"),
    ({"level_weights": [0.0, 0.0]}, ValueError, "level_weights"),
    ({"level_weights": 1.0}, TypeError, "level_weights"),
    ({"gate_weight": -1.0}, ValueError, "gate_weight"),
    ({"gate_weight": math.inf}, ValueError, "gate_weight"),
    ({"gate_weight": 1e39}, ValueError, "gate_weight"),
    ({"expert_weight": -0.1}, ValueError, "expert_weight"),
    ({"expert_weight": None}, TypeError, "expert_weight"),
    ({"expert_weight": 1e39}, ValueError, "expert_weight"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"ignore_index": True}, TypeError, "ignore_index"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"backend": "fortran"}, ValueError, "backend"),
    ({"return_stats": "yes"}, TypeError, "return_stats"),
]


@pytest.mark.parametrize("bad, error, name", BAD_OPTIONS)
def test_bad_option_names_the_argument(inputs, bad, error, name):
    with pytest.raises(error, match=name):
        fused_moe_kd_loss(*inputs, **bad)


def test_unknown_backend_lists_the_valid_ones(inputs):
    with pytest.raises(ValueError, match=r"'auto'.*'reference'"):
        fused_moe_kd_loss(*inputs, backend="nope")


def test_errors_say_what_was_given(inputs):
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.0001, 10000\], got -2.0"):
        fused_moe_kd_loss(*inputs, temperature=-2.0)
    with pytest.raises(ValueError, match=r"expert_strength\[1\].*got -1.0"):
        fused_moe_kd_loss(inputs[0], torch.stack([inputs[1]] * 2), inputs[2], expert_strength=[1.0, -1.0])


BAD_TENSORS = [
    (lambda s, t, y: (s.long(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: (s, t.long(), y), TypeError, "teacher_logits"),
    (lambda s, t, y: (s, t, y.float()), TypeError, "target"),
    (lambda s, t, y: (s, t, y.bool()), TypeError, "target"),
    (lambda s, t, y: (s.numpy(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: (s, t[:, :-1], y), ValueError, "teacher_logits"),
    (lambda s, t, y: (s, t.unsqueeze(0).expand(2, 3, N, C), y), ValueError, "teacher_logits"),
    (lambda s, t, y: (s, t, y[:-1]), ValueError, "target"),
    (lambda s, t, y: (s, t, y.unsqueeze(1)), ValueError, "target"),
    (lambda s, t, y: (s[0, 0], t[0, 0], y[0]), ValueError, "student_logits"),
    (lambda s, t, y: (s, t, torch.tensor([0, 1, C, -100])), ValueError, "target"),
    (lambda s, t, y: (s, t, torch.tensor([0, -1, 2, -100])), ValueError, "target"),
    (lambda s, t, y: (s[:, :0], t[:, :0], y), ValueError, "C=0"),
]


@pytest.mark.parametrize("make, error, name", BAD_TENSORS)
def test_bad_tensor_names_the_argument(inputs, make, error, name):
    with pytest.raises(error, match=name):
        fused_moe_kd_loss(*make(*inputs))


def test_out_of_range_target_message_gives_the_value(inputs):
    s, t, _ = inputs
    with pytest.raises(ValueError, match=rf"\[0, {C}\).*got 7"):
        fused_moe_kd_loss(s, t, torch.tensor([0, 7, 1, 1]))


def test_devices_must_match(inputs):
    s, t, y = inputs
    with pytest.raises(ValueError, match="one device"):
        fused_moe_kd_loss(s, t.to("meta"), y)


def test_per_level_lists_must_match_levels(inputs):
    s, t, y = inputs
    teacher = torch.stack([t, t, t])
    with pytest.raises(ValueError, match=r"temperature.*L=3.*length 2"):
        fused_moe_kd_loss(s, teacher, y, temperature=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"level_weights.*L=3"):
        fused_moe_kd_loss(s, teacher, y, level_weights=[1.0])


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        MoEKDLoss(reduction="max")
    with pytest.raises(ValueError, match="backend"):
        MoEKDLoss(backend="gpu")
    with pytest.raises(ValueError, match="temperature"):
        MoEKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="expert_strength"):
        MoEKDLoss(temperature=[1.0, 2.0], expert_strength=[1.0, 2.0, 3.0])


def test_level_weights_are_normalised():
    opts = resolve_options(3, temperature=1.0, expert_strength=1.0, level_weights=[1.0, 3.0, 0.0],
                           gate_weight=1.0, expert_weight=1.0, ignore_index=-100)
    assert opts.level_weights == (0.25, 0.75, 0.0)
    uniform = resolve_options(4, temperature=1.0, expert_strength=1.0, level_weights=None,
                              gate_weight=1.0, expert_weight=1.0, ignore_index=-100)
    assert uniform.level_weights == (0.25,) * 4


def test_validation_runs_before_any_kernel(monkeypatch, inputs):
    from moekd_kernels import backends

    called = []
    monkeypatch.setattr(backends.Backend, "forward", lambda self, *a: called.append(a))
    with pytest.raises(ValueError):
        fused_moe_kd_loss(*inputs, temperature=-1.0)
    with pytest.raises(ValueError):
        fused_moe_kd_loss(inputs[0], inputs[1], torch.tensor([0, 1, 99, 2]))
    assert called == []


# ---------------------------------------------------------------------------------
# Targets are compared as int64, whatever their integer dtype
# ---------------------------------------------------------------------------------

CPU_BACKENDS = available_backends("cpu")
NUM_CLASSES_WIDE = 160


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype, ignore_index, clash", [
    (torch.uint8, -100, 156),           # -100 wraps to 156 in uint8
    (torch.uint8, 2 ** 8 + 5, 5),       # ... and 261 to 5
    (torch.int8, 2 ** 8 + 5, 5),
    (torch.int16, 2 ** 16 + 5, 5),
    (torch.int32, 2 ** 32 + 5, 5),
], ids=str)
def test_narrow_target_never_matches_an_ignore_index_it_cannot_hold(backend, dtype, ignore_index, clash):
    """An ignore_index outside the target dtype's range matches nothing: the row whose class
    is its wrapped value counts, in the loss, its gradient and the mean's row count, exactly
    as with an int64 target."""
    g = torch.Generator().manual_seed(12)
    student = 3 * torch.randn(6, NUM_CLASSES_WIDE, generator=g)
    teacher = 3 * torch.randn(6, NUM_CLASSES_WIDE, generator=g)
    target = torch.tensor([clash, 1, clash, 7, 100, 3])

    def run(y, reduction):
        s = student.clone().requires_grad_(True)
        loss = fused_moe_kd_loss(s, teacher, y, ignore_index=ignore_index, reduction=reduction,
                                 backend=backend)
        loss.sum().backward()
        return loss.detach(), s.grad

    for reduction in ("none", "mean"):
        want_loss, want_grad = run(target, reduction)
        got_loss, got_grad = run(target.to(dtype), reduction)
        assert torch.equal(got_loss, want_loss) and torch.equal(got_grad, want_grad)
        assert (got_grad[[0, 2]] != 0).any(dim=1).all()
    assert (run(target.to(dtype), "none")[0][[0, 2]] > 0).all()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_narrow_target_matches_an_ignore_index_it_can_hold(dtype):
    g = torch.Generator().manual_seed(13)
    student, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    target = torch.tensor([0, -100, 5, -100], dtype=dtype)
    loss = fused_moe_kd_loss(student, teacher, target, reduction="none", backend="reference")
    assert (loss[[1, 3]] == 0).all() and (loss[[0, 2]] > 0).all()


def test_flatten_inputs_hands_backends_an_int64_target():
    s = torch.randn(3, 4)
    _, _, target = flatten_inputs(s, s, torch.tensor([0, 1, 3], dtype=torch.uint8))
    assert target.dtype == torch.int64 and target.tolist() == [0, 1, 3]


# ---------------------------------------------------------------------------------
# Messages: argument, what was expected, what was given
# ---------------------------------------------------------------------------------

def test_ignore_index_beyond_int64_says_the_range(inputs):
    for value in (2 ** 63, -(2 ** 63) - 1):
        with pytest.raises(ValueError) as info:
            fused_moe_kd_loss(*inputs, ignore_index=value)
        message = str(info.value)
        assert "ignore_index" in message and "int64 range" in message and str(value) in message
    # The int64 extremes themselves are fine (and match no target).
    for value in (2 ** 63 - 1, -(2 ** 63)):
        assert torch.isfinite(fused_moe_kd_loss(inputs[0], inputs[1], torch.tensor([0, 1, 2, 3]),
                                                ignore_index=value))


def test_scalar_level_weights_ask_for_a_sequence():
    with pytest.raises(TypeError) as info:
        MoEKDLoss(level_weights=5)
    message = str(info.value)
    assert "level_weights" in message and "sequence" in message and "5 (int)" in message


def test_huge_level_weights_are_normalised_not_overflowed(inputs):
    """Only the ratios matter: weights near the float64 maximum (whose sum overflows)
    give the same levels as [1, 3]."""
    s, t, y = inputs
    teacher = torch.stack([t, -t])
    opts = resolve_options(2, temperature=1.0, expert_strength=1.0, level_weights=[4e307, 1.2e308],
                           gate_weight=1.0, expert_weight=1.0, ignore_index=-100)
    assert opts.level_weights == (0.25, 0.75)
    tiny = resolve_options(2, temperature=1.0, expert_strength=1.0, level_weights=[1e-320, 3e-320],
                           gate_weight=1.0, expert_weight=1.0, ignore_index=-100)
    assert tiny.level_weights == (0.25, 0.75)
    huge = fused_moe_kd_loss(s, teacher, y, level_weights=[1e308, 1e308])
    assert torch.equal(huge, fused_moe_kd_loss(s, teacher, y, level_weights=[1.0, 1.0]))
    with pytest.raises(ValueError, match=r"level_weights\[1\] must be a finite number >= 0, got inf"):
        fused_moe_kd_loss(s, teacher, y, level_weights=[1.0, math.inf])
    with pytest.raises(ValueError, match=r"level_weights\[0\] must be a finite number, got an int of 1025 bits"):
        fused_moe_kd_loss(s, teacher, y, level_weights=[2 ** 1024, 1])


@pytest.mark.parametrize("position", ["student_logits", "teacher_logits", "target"])
def test_numpy_arrays_are_named_not_printed(inputs, position):
    s, t, y = inputs
    big = {"student_logits": torch.randn(64, 50), "teacher_logits": torch.randn(64, 50),
           "target": torch.zeros(64, dtype=torch.long)}
    big[position] = big[position].numpy()
    with pytest.raises(TypeError) as info:
        fused_moe_kd_loss(big["student_logits"], big["teacher_logits"], big["target"])
    message = str(info.value)
    shape = (64, 50) if position != "target" else (64,)
    assert message.startswith(f"{position} must be a torch.Tensor")
    assert f"a numpy.ndarray of shape {shape}" in message and "torch.from_numpy" in message
    assert len(message) < 250  # the array's values are not in it


# ---------------------------------------------------------------------------------
# Ranges the float32 kernels can compute (options.py explains the bounds)
# ---------------------------------------------------------------------------------

EDGES = [
    ("temperature", MIN_TEMPERATURE, math.nextafter(MIN_TEMPERATURE, 0.0)),
    ("temperature", MAX_TEMPERATURE, math.nextafter(MAX_TEMPERATURE, math.inf)),
    ("gate_weight", MAX_TERM_WEIGHT, math.nextafter(MAX_TERM_WEIGHT, math.inf)),
    ("expert_weight", MAX_TERM_WEIGHT, math.nextafter(MAX_TERM_WEIGHT, math.inf)),
]


@pytest.mark.parametrize("name, accepted, rejected", EDGES, ids=[f"{e[0]}={e[1]:g}" for e in EDGES])
def test_next_value_past_each_bound_is_rejected_with_the_range(inputs, name, accepted, rejected):
    with pytest.raises(ValueError) as info:
        fused_moe_kd_loss(*inputs, **{name: rejected})
    message = str(info.value)
    assert message.startswith(f"{name} must be a number in [") and f"got {rejected!r}" in message
    assert torch.isfinite(fused_moe_kd_loss(*inputs, **{name: accepted}))


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in CPU_BACKENDS])
@pytest.mark.parametrize("name, accepted, rejected", EDGES, ids=[f"{e[0]}={e[1]:g}" for e in EDGES])
def test_each_bound_itself_computes_the_oracle_result(backend, name, accepted, rejected):
    """The extreme settings accepted are computed, finite and to float32 accuracy; the
    largest weights at the largest temperature too (λ_g·τ² = 1e16)."""
    options = {name: accepted}
    if name == "gate_weight":
        options["temperature"] = MAX_TEMPERATURE
    case = make_case(6, 9, 2, seed=14, **options)
    errs = check_backend(backend, case)
    loss = fused_moe_kd_loss(case.student, case.teacher, case.target, backend=backend, **options)
    assert torch.isfinite(loss) and max(errs.values()) <= 1e-5
