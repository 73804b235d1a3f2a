"""Hypothesis profiles and per-backend example budgets for the property tests.

    MOEKD_HYPOTHESIS_PROFILE=ci    (default) few examples, derandomized: CI-sized and reproducible
    MOEKD_HYPOTHESIS_PROFILE=long  many random examples, for a soak run before a release

The Triton backend runs under TRITON_INTERPRET=1 on CPU, a Python loop per program
instance, so it gets a fraction of the examples and smaller tensors.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

import moekd_kernels

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("MOEKD_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

# Collected once at import: a backend that lands later is tested without editing the tests.
BACKENDS = moekd_kernels.available_backends("cpu")

# Fraction of the profile's examples each backend gets, and its tensor size limits.
_SHARE = {"triton": 0.2}
_MAX_ROWS = {"triton": 5}
_MAX_CLASSES = {"triton": 24}


def budget(backend: str, share: float = 1.0) -> settings:
    """Settings for one property test on ``backend``: the profile's examples scaled down."""
    examples = int(settings().max_examples * share * _SHARE.get(backend, 1.0))
    return settings(settings(), max_examples=max(3, examples))


def max_rows(backend: str) -> int:
    return _MAX_ROWS.get(backend, 12)


def max_classes(backend: str) -> int:
    return _MAX_CLASSES.get(backend, 40)
