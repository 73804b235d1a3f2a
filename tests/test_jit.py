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


def test_import_built_tries_every_candidate(tmp_path):
    """A stale or half-written library first in order must not hide a good one."""
    import sysconfig

    from moekd_kernels._jit import import_built

    good = tmp_path / f"moekd_tiny{sysconfig.get_config_var('EXT_SUFFIX')}"
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY_SOURCE)
    include = sysconfig.get_paths()["include"]
    proc = subprocess.run(["c++", "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(good)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no C++ compiler for the tiny module: {proc.stderr[-500:]}")
    (tmp_path / "moekd_tiny.a-broken.so").write_bytes(b"not an ELF file")   # sorts first
    candidates = sorted(tmp_path.glob("moekd_tiny.*so"))
    assert candidates[0].name == "moekd_tiny.a-broken.so" and good in candidates
    module = import_built("moekd_tiny", tmp_path)
    assert module is not None and module.__name__ == "moekd_tiny"
    assert import_built("moekd_none", tmp_path) is None


def test_loaded_extension_builds_once_and_does_not_cache_a_precheck():
    from moekd_kernels._jit import JitExtension, LoadedExtension

    kernel = JitExtension("a test kernel", ("x.cpp",), (), marker="x.cpp")
    calls, reason = [], ["no device"]

    def build():
        calls.append(1)
        raise RuntimeError("compiler says no")

    loaded = LoadedExtension(kernel, build, precheck=lambda: reason[0])
    assert loaded.load() == (None, "no device") and not calls      # asked again next time
    reason[0] = None
    module, failure = loaded.load()
    assert module is None and "a test kernel could not be built (RuntimeError): compiler says no" in failure
    assert loaded.load() == (None, failure) and len(calls) == 1     # a failed build is not retried
    with pytest.raises(RuntimeError, match="backend='x' is not available: a test kernel could not be built"):
        loaded.require("x")


def test_check_kernel_inputs_names_what_is_wrong():
    import torch

    from moekd_kernels._jit import check_kernel_inputs

    s, t = torch.zeros(2, 3), torch.zeros(9, 2, 3)
    with pytest.raises(ValueError, match="L=9 levels; backend 'cpu' supports at most 8"):
        check_kernel_inputs("cpu", s, t)
    check_kernel_inputs("triton", s, t, max_levels=None, device_types=("cuda", "cpu"))
    with pytest.raises(ValueError, match=r"takes student \(N, C\) and teacher \(L, N, C\), got \(2, 3\) and \(2, 3\)"):
        check_kernel_inputs("triton", s, t[0], max_levels=None, device_types=("cuda", "cpu"))
    with pytest.raises(ValueError, match="backend 'cuda' takes CUDA tensors"):
        check_kernel_inputs("cuda", s, t[:1])
    with pytest.raises(TypeError, match="teacher_logits must be float32, bfloat16 or float16 for backend 'cuda'"):
        check_kernel_inputs("cuda", s, t[:1].double())
