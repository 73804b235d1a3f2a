import os
import sys
from typing import Optional

import pytest

# Triton reads this at import: without a GPU, its interpreter runs the kernels on CPU tensors.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

sys.path.insert(0, os.path.dirname(__file__))

# CI sets CI=true (.ci/run does too). There every kernel must build: a missing one is a
# failure of the run, not a reason to skip its tests.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def requires(what: str, reason: Optional[str]):
    """A mark for tests that need ``what``, unavailable here when ``reason`` is not None:
    they are skipped with that reason, except in CI, where they fail with it."""
    if reason is None:
        return pytest.mark.requires_available(what)
    if IN_CI:
        return pytest.mark.fail_in_ci(what=what, reason=reason)
    return pytest.mark.skip(reason=f"{what} unavailable: {reason}")


def skip_or_fail(what: str, reason: str):
    """Inside a test or fixture: ``pytest.skip`` with the reason, or in CI ``pytest.fail``."""
    if IN_CI:
        pytest.fail(f"{what} unavailable in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_available(what): the test needs this; it is available")
    config.addinivalue_line("markers", "fail_in_ci(what, reason): needed but unavailable, and in CI that fails")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("fail_in_ci"):
        pytest.fail(f"{mark.kwargs['what']} unavailable in CI (CI=true): {mark.kwargs['reason']}", pytrace=False)
