"""Every bad argument raises before any kernel runs, naming the argument."""

import math

import pytest
import torch

from moekd_kernels import MoEKDLoss, fused_moe_kd_loss
from moekd_kernels.options import MAX_EXPERT_STRENGTH, resolve_options

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
