"""The JIT build cache shared by the compiled backends (moekd_kernels/_jit.py)."""

import re
import subprocess
import sys
import textwrap

import pytest

from moekd_kernels._jit import build_lock

fcntl = pytest.importorskip("fcntl", reason="the build lock is POSIX-only")

# A Python module with no torch in it: builds in seconds through torch's load().
TINY_SOURCE = textwrap.dedent("""
    #include <Python.h>
    static struct PyModuleDef tiny_def = {PyModuleDef_HEAD_INIT, "moekd_tiny", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit_moekd_tiny(void) { return PyModule_Create(&tiny_def); }
""")


def test_build_lock_clears_a_lock_file_left_by_a_dead_build(tmp_path):
    (tmp_path / "lock").write_text("")
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    # Released on exit: another holder gets it at once.
    with open(tmp_path / ".moekd_build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_build_after_an_interrupted_one_does_not_wait_forever(tmp_path):
    """torch waits while its 'lock' file exists; a process killed mid-build leaves one.
    The build runs in a child process with a deadline, so a hang fails the test."""
    csrc, build_dir = tmp_path / "csrc", tmp_path / "build"
    csrc.mkdir()
    build_dir.mkdir()
    (csrc / "tiny.cpp").write_text(TINY_SOURCE)
    (build_dir / "lock").write_text("")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from moekd_kernels._jit import JitExtension
        ext = JitExtension("a test module", ("tiny.cpp",), (), marker="tiny.cpp")
        module = ext.build(Path({str(csrc)!r}), Path({str(build_dir)!r}), "moekd_tiny")
        print("built", module.__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built moekd_tiny" in proc.stdout
    assert "left by an interrupted build" in proc.stderr
    assert (build_dir / "sources.sha256").is_file()
    # The build says what it costs before, and how long it took after.
    assert "moekd_kernels: building a test module (once per machine and version; about 1-2 minutes" \
        in proc.stderr
    assert re.search(r"moekd_kernels: built a test module in \d+ s\n", proc.stderr), proc.stderr[-3000:]
