"""The backend registry: one table, "auto" resolution, clear errors."""

import pytest
import torch

from conftest import IN_CI
from moekd_kernels import available_backends, backend_names, describe_auto
from moekd_kernels.backends import AUTO_ORDER, BACKENDS, auto_backend, check_backend_name, resolve_backend


def test_table_lists_every_backend_once():
    assert backend_names() == ("auto", "reference", "cpu", "triton", "cuda")
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.devices and backend.description
    for order in AUTO_ORDER.values():
        assert set(order) <= set(BACKENDS) and order[-1] == "reference"


def test_reference_is_always_available_on_cpu():
    assert "reference" in available_backends("cpu")
    assert BACKENDS["reference"].unavailable_reason("cpu") is None


def test_auto_picks_the_cpu_kernel_for_cpu_tensors_when_it_built():
    """docs/math.md, API: "auto" picks the fastest available backend; on CPU tensors that is the
    C++ kernel, and the reference only when the kernel is unavailable (never in CI)."""
    cpu_reason = BACKENDS["cpu"].unavailable_reason("cpu")
    assert not (IN_CI and cpu_reason), f"the cpu kernel must build in CI: {cpu_reason}"
    chosen = auto_backend("cpu")
    assert chosen == ("cpu" if cpu_reason is None else "reference")
    assert AUTO_ORDER["cpu"] == ("cpu", "reference")
    assert f"cpu: {chosen!r}" in describe_auto()


def test_float64_goes_to_the_reference_under_auto():
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"


def test_device_type_mismatch_is_explained():
    reason = BACKENDS["cpu"].unavailable_reason("cuda")
    assert reason is not None and "cpu" in reason
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("bad", ["", "CPU", None, 3])
def test_unknown_names_raise_value_error(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend_name(bad)


def test_auto_routes_more_levels_than_the_kernels_hold_to_a_backend_that_takes_them():
    limited = [n for n, b in BACKENDS.items() if b.max_levels is not None]
    assert set(limited) == {"cpu", "cuda"}
    many = BACKENDS["cpu"].max_levels + 1
    assert BACKENDS[auto_backend("cpu", many)].supports_levels(many)
    with pytest.raises(ValueError, match=r"teacher_logits has L=9 levels.*'cpu' supports at most 8"):
        resolve_backend("cpu", torch.device("cpu"), torch.float32, many)
