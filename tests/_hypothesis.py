"""Hypothesis profiles and per-backend example budgets for the property tests.

    MOEKD_HYPOTHESIS_PROFILE=ci    (default) few examples, derandomized: CI-sized and reproducible
    MOEKD_HYPOTHESIS_PROFILE=long  many random examples, for a soak run before a release
    MOEKD_HYPOTHESIS_PROFILE=mutants  the ci draws without shrinking (tests/mutants.py)

What "ci" covers: derandomized, so every run draws the same examples (a failure
reproduces; new coverage needs new draws, i.e. "long" or a new explicit test). Per
backend, 40 × the test's share × the backend's share examples (``budget``): for
reference and cpu, 80 oracle comparisons, 40 each of the metamorphic properties, 20
long rows, 20 reduction draws; Triton a fifth of that (at least 3 per test). Those
draws include τ = 1 and τ ≠ 1, 1-3 levels with per-level options, all three input
dtypes and float64/bf16/fp32 teachers, −inf masks, ties, ignored rows (all-ignored
batches in one draw in ten), ignore_index inside [0, C), and long rows past every
block size (test_properties.py, ``cases``). The exact draws depend on the strategies:
changing a strategy changes them.

The Triton backend runs under TRITON_INTERPRET=1 on CPU, a Python loop per program
instance, so it gets a fraction of the examples and smaller tensors.
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, Phase, settings

import moekd_kernels

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The ci draws without shrinking: tests/mutants.py only needs to know that a test fails,
# and shrinking a failure costs minutes.
settings.register_profile("mutants", settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile(
    "long",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("MOEKD_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

from conftest import IN_CI

# Collected once at import: a backend that lands later is tested without editing the tests.
BACKENDS = moekd_kernels.available_backends("cpu")
# In CI every backend that can run on CPU tensors must: one that failed to build stays in
# the parametrization, and its tests fail with the backend's reason instead of vanishing.
EXPECTED_IN_CI = ("reference", "cpu", "triton")
if IN_CI:
    BACKENDS = tuple(name for name in moekd_kernels.backends.BACKENDS
                     if name in BACKENDS or name in EXPECTED_IN_CI)

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


# Long rows: past every block size. The CPU kernel sums classes in float32 within blocks
# of 1024 (kSumBlock, csrc/cpu/moekd_cpu.cpp) and in double across them, so 1025-2100
# classes give two or three blocks, the last one partial. Triton's multi-block path
# starts past TILES[device].single values (16384 under the interpreter, too slow there),
# so its long rows run with 32-value tiles (``forced_small_blocks``): 33-96 classes are
# then 2-3 blocks at L = 1 and 3-6 blocks of 16 at L > 1.
_LARGE_CLASSES = {"triton": (33, 96)}
_SMALL_TILE = 32


def large_classes(backend: str):
    return _LARGE_CLASSES.get(backend, (1025, 2100))


@contextlib.contextmanager
def forced_small_blocks(backend: str, enabled: bool):
    """Run ``backend`` with small blocks where it has a block size the tests can set."""
    if not enabled or backend != "triton":
        yield
        return
    from moekd_kernels import triton_backend
    saved = dict(triton_backend.TILES)
    for device in saved:
        triton_backend.TILES[device] = triton_backend.Tiles(_SMALL_TILE, _SMALL_TILE, _SMALL_TILE)
    try:
        yield
    finally:
        triton_backend.TILES.update(saved)
